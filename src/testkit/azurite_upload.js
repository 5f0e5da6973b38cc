// node azurite_upload.js ENDPOINT CONTAINER DIR
// Creates CONTAINER on an Azurite server with public read access and uploads every file under
// DIR into it, named by its path relative to DIR. The key is Azurite's published development
// key, the same on every installation.
const { BlobServiceClient, StorageSharedKeyCredential } = require('@azure/storage-blob');
const fs = require('fs');
const path = require('path');

const [endpoint, container, dir] = process.argv.slice(2);
const account = 'devstoreaccount1';
const key = 'Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==';
const service = new BlobServiceClient(`${endpoint}/${account}`, new StorageSharedKeyCredential(account, key));

const walk = (d) => fs.readdirSync(d, { withFileTypes: true })
  .flatMap((e) => (e.isDirectory() ? walk(path.join(d, e.name)) : [path.join(d, e.name)]));

(async () => {
  const client = service.getContainerClient(container);
  await client.create({ access: 'container' });
  for (const file of walk(dir)) {
    const name = path.relative(dir, file).split(path.sep).join('/');
    await client.getBlockBlobClient(name).uploadFile(file);
  }
})().catch((e) => {
  console.error(`${container}: ${e.message}`);
  process.exit(1);
});
