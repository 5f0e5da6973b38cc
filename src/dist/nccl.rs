//! NCCL, NVIDIA's GPU collectives, for averaging gradients where they are: on the GPU.
//!
//! patchgd does not link NCCL. The CUDA builds of libtorch already load it (`libtorch_cuda.so`
//! needs `libnccl.so.2`, which the PyTorch wheel ships in `nvidia/nccl/lib`), so its functions
//! are looked up in the running process, and only failing that in a `libnccl.so.2` on the
//! library path. A libtorch without CUDA has no use for it, and a process that never averages
//! on a GPU never looks.
//!
//! The communicator is made the way Horovod and PyTorch make theirs: rank 0 asks NCCL for a
//! unique id, MPI broadcasts its 128 bytes, and every rank joins with it on its own GPU. The
//! all-reduce is queued on the GPU's default stream, the stream libtorch's kernels use (patchgd
//! never switches streams), so it runs after the kernels that computed the gradients and
//! before those that read the sums, without the host waiting for either.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

use libloading::os::unix::{Library, Symbol};

use super::{DistError, Group};

const UNIQUE_ID_BYTES: usize = 128;

/// `ncclUniqueId`: what every rank needs to join the same communicator.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId([u8; UNIQUE_ID_BYTES]);

type NcclResult = c_int;
type RawComm = *mut c_void;
const NCCL_SUCCESS: NcclResult = 0;
const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;

/// The NCCL (and CUDA runtime) functions patchgd calls, found once per process.
struct Api {
    _library: Library,
    get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> NcclResult,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        RawComm,
        *mut c_void,
    ) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(RawComm) -> NcclResult,
    comm_abort: unsafe extern "C" fn(RawComm) -> NcclResult,
    get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    get_last_error: unsafe extern "C" fn(RawComm) -> *const c_char,
    /// The CUDA runtime's, from the same process (libtorch loads it): NCCL joins on the
    /// calling thread's current GPU.
    cuda_set_device: Option<unsafe extern "C" fn(c_int) -> c_int>,
    cuda_get_error_string: Option<unsafe extern "C" fn(c_int) -> *const c_char>,
}

// SAFETY: the function pointers are plain C functions, valid for the life of the library the
// struct owns; NCCL's own functions may be called from any thread.
unsafe impl Send for Api {}
unsafe impl Sync for Api {}

fn symbol<T: Copy>(library: &Library, name: &str) -> Result<T, String> {
    // SAFETY: each name is looked up with the C signature nccl.h / cuda_runtime_api.h give it.
    unsafe {
        library
            .get::<T>(name.as_bytes())
            .map(|s: Symbol<T>| *s)
            .map_err(|e| format!("{name}: {e}"))
    }
}

impl Api {
    fn from(library: Library) -> Result<Self, String> {
        Ok(Self {
            get_version: symbol(&library, "ncclGetVersion")?,
            get_unique_id: symbol(&library, "ncclGetUniqueId")?,
            comm_init_rank: symbol(&library, "ncclCommInitRank")?,
            all_reduce: symbol(&library, "ncclAllReduce")?,
            comm_destroy: symbol(&library, "ncclCommDestroy")?,
            comm_abort: symbol(&library, "ncclCommAbort")?,
            get_error_string: symbol(&library, "ncclGetErrorString")?,
            get_last_error: symbol(&library, "ncclGetLastError")?,
            cuda_set_device: symbol(&Library::this(), "cudaSetDevice").ok(),
            cuda_get_error_string: symbol(&Library::this(), "cudaGetErrorString").ok(),
            _library: library,
        })
    }

    /// The process's NCCL: already loaded by libtorch, else `libnccl.so.2` from the library path.
    fn get() -> Result<&'static Api, DistError> {
        static API: OnceLock<Result<Api, String>> = OnceLock::new();
        API.get_or_init(|| {
            Api::from(Library::this()).or_else(|in_process| {
                // SAFETY: loading NCCL runs no initialiser with requirements of ours.
                let library = unsafe { Library::new("libnccl.so.2") }.map_err(|e| {
                    format!(
                        "not loaded by libtorch ({in_process}), and not on the library path ({e})"
                    )
                })?;
                Api::from(library)
            })
        })
        .as_ref()
        .map_err(|e| DistError::NcclMissing(e.clone()))
    }

    fn error(&self, code: NcclResult, comm: RawComm) -> String {
        // SAFETY: NCCL returns static strings; a null comm asks for the process's last error.
        let name = unsafe { c_text((self.get_error_string)(code)) };
        let detail = unsafe { c_text((self.get_last_error)(comm)) };
        if detail.is_empty() {
            name
        } else {
            format!("{name} ({detail})")
        }
    }
}

/// # Safety
/// `text` is null or a NUL-terminated string that lives long enough.
unsafe fn c_text(text: *const c_char) -> String {
    if text.is_null() {
        String::new()
    } else {
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .trim()
            .to_string()
    }
}

/// The NCCL version this process would use, as "2.28.9".
pub fn version() -> Result<String, DistError> {
    let api = Api::get()?;
    let mut code = 0;
    // SAFETY: writes one int.
    let result = unsafe { (api.get_version)(&mut code) };
    if result != NCCL_SUCCESS {
        return Err(DistError::Nccl(api.error(result, std::ptr::null_mut())));
    }
    // Since 2.9: major * 10000 + minor * 100 + patch.
    Ok(format!(
        "{}.{}.{}",
        code / 10000,
        code / 100 % 100,
        code % 100
    ))
}

/// A new id for a communicator (rank 0 makes it; the others receive it).
pub fn unique_id() -> Result<UniqueId, DistError> {
    let api = Api::get()?;
    let mut id = UniqueId([0; UNIQUE_ID_BYTES]);
    // SAFETY: writes the 128-byte struct.
    let result = unsafe { (api.get_unique_id)(&mut id) };
    if result != NCCL_SUCCESS {
        return Err(DistError::Nccl(format!(
            "no unique id: {}",
            api.error(result, std::ptr::null_mut())
        )));
    }
    Ok(id)
}

impl UniqueId {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// One rank's membership of an NCCL communicator, on one GPU.
pub struct Communicator {
    raw: RawComm,
    api: &'static Api,
    gpu: usize,
    rank: usize,
    ranks: usize,
}

impl Communicator {
    /// Join `group`'s ranks on GPU `gpu`: rank 0's id reaches the others through the group.
    pub fn for_group(group: &Group, gpu: usize) -> Result<Self, DistError> {
        let mut id = if group.is_root() {
            unique_id()?
        } else {
            UniqueId([0; UNIQUE_ID_BYTES])
        };
        group.broadcast_bytes(&mut id.0);
        Self::join(id, group.rank(), group.size(), gpu)
    }

    /// Join the communicator `id` as `rank` of `ranks`, on GPU `gpu`. Blocks until every rank
    /// has joined.
    pub fn join(id: UniqueId, rank: usize, ranks: usize, gpu: usize) -> Result<Self, DistError> {
        let api = Api::get()?;
        let whose = format!("rank {rank} of {ranks}, GPU {gpu}");
        select_gpu(api, gpu).map_err(|e| DistError::Nccl(format!("{whose}: {e}")))?;
        let mut raw: RawComm = std::ptr::null_mut();
        // SAFETY: `raw` receives the communicator; the id is passed by value as nccl.h says.
        let result = unsafe { (api.comm_init_rank)(&mut raw, ranks as c_int, id, rank as c_int) };
        if result != NCCL_SUCCESS {
            return Err(DistError::Nccl(format!(
                "{whose}: could not join the communicator: {}",
                api.error(result, raw)
            )));
        }
        Ok(Self {
            raw,
            api,
            gpu,
            rank,
            ranks,
        })
    }

    pub fn gpu(&self) -> usize {
        self.gpu
    }

    /// Sum `values` (contiguous f32 on this communicator's GPU) over the ranks, in place, on the
    /// GPU's default stream. A failure is fatal, as MPI's are: a rank that cannot take part in a
    /// collective cannot let the others go on with different weights.
    pub fn all_reduce_sum_in_place(&self, values: &tch::Tensor) {
        assert_eq!(values.kind(), tch::Kind::Float, "NCCL buffers are f32");
        assert_eq!(values.device(), tch::Device::Cuda(self.gpu));
        assert!(values.is_contiguous());
        let result = select_gpu(self.api, self.gpu).and_then(|()| {
            // SAFETY: `values` is a live contiguous f32 buffer of `numel` values on our GPU; a
            // null stream is the default stream, the one libtorch queued its writes on.
            let result = unsafe {
                (self.api.all_reduce)(
                    values.data_ptr(),
                    values.data_ptr(),
                    values.numel(),
                    NCCL_FLOAT32,
                    NCCL_SUM,
                    self.raw,
                    std::ptr::null_mut(),
                )
            };
            if result == NCCL_SUCCESS {
                Ok(())
            } else {
                Err(self.api.error(result, self.raw))
            }
        });
        if let Err(e) = result {
            panic!(
                "NCCL all-reduce failed on rank {} of {} (GPU {}): {e}",
                self.rank, self.ranks, self.gpu
            );
        }
    }
}

/// Make `gpu` the calling thread's current device (NCCL joins and queues on it).
fn select_gpu(api: &Api, gpu: usize) -> Result<(), String> {
    let Some(set_device) = api.cuda_set_device else {
        return Err(
            "the CUDA runtime is not loaded in this process (is libtorch a CUDA build?)".into(),
        );
    };
    // SAFETY: a plain CUDA runtime call.
    let code = unsafe { set_device(gpu as c_int) };
    if code == 0 {
        return Ok(());
    }
    let why = api
        .cuda_get_error_string
        // SAFETY: CUDA returns static strings.
        .map(|f| unsafe { c_text(f(code)) })
        .unwrap_or_default();
    Err(format!(
        "CUDA could not select the GPU: error {code}: {why}"
    ))
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // SAFETY: `raw` is ours. While unwinding from a failure, abort: destroy would wait for
        // collectives that peers may never join.
        unsafe {
            if std::thread::panicking() {
                (self.api.comm_abort)(self.raw);
            } else {
                (self.api.comm_destroy)(self.raw);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_comes_with_libtorch_and_hands_out_fresh_ids() {
        let version = version().expect("the CUDA libtorch that scripts/setup installs loads NCCL");
        assert!(version.starts_with("2."), "{version}");
        let (a, b) = (unique_id().unwrap(), unique_id().unwrap());
        assert!(a.as_bytes().iter().any(|&x| x != 0));
        assert_ne!(a.as_bytes(), b.as_bytes());
    }

    #[test]
    fn a_communicator_of_one_sums_on_its_gpu_or_says_which_gpu_it_lacks() {
        let joined = Communicator::join(unique_id().unwrap(), 0, 1, 0);
        if tch::Cuda::is_available() {
            let comm = joined.expect("one rank on GPU 0");
            let values =
                tch::Tensor::from_slice(&[1.5f32, -2.0, 3.0]).to_device(tch::Device::Cuda(0));
            comm.all_reduce_sum_in_place(&values);
            let back: Vec<f32> = Vec::try_from(values.to_device(tch::Device::Cpu)).unwrap();
            assert_eq!(back, [1.5, -2.0, 3.0]);
        } else {
            let e = joined.err().expect("no GPU here").to_string();
            assert!(
                e.contains("rank 0 of 1, GPU 0") && e.contains("CUDA"),
                "{e}"
            );
        }
    }
}
