//! Final weights as safetensors (loadable with `safetensors.torch.load_file` in PyTorch).

use tch::Tensor;

/// Encode named tensors as safetensors bytes (via a temporary file: tch writes to paths).
pub fn safetensors_bytes(tensors: &[(String, Tensor)]) -> std::io::Result<Vec<u8>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("weights.safetensors");
    let named: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), t.to_device(tch::Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&named, &path).map_err(std::io::Error::other)?;
    std::fs::read(&path)
}
