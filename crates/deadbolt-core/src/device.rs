//! Device selection: `auto` uses CUDA when libtorch sees a GPU.

use tch::Device;

use crate::error::{Error, Result};
use crate::spec::DeviceSpec;

/// Makes sure libtorch's CUDA library is loaded. The linker may drop it from
/// the binary's needed libraries (nothing references it by symbol), in which
/// case CUDA looks unavailable; loading it by name fixes that.
fn load_cuda_library() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for name in [c"libtorch_cuda.so", c"libtorch_cuda_cu.so"] {
            // SAFETY: dlopen with a static NUL-terminated name; the handle is
            // intentionally leaked so the library stays loaded.
            unsafe {
                libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
            }
        }
    });
}

pub fn cuda_available() -> bool {
    load_cuda_library();
    tch::Cuda::is_available()
}

pub fn resolve(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => Ok(if cuda_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        DeviceSpec::Cuda => {
            if cuda_available() {
                Ok(Device::Cuda(0))
            } else {
                Err(Error::invalid(
                    "training.device",
                    "cuda requested but libtorch sees no CUDA device",
                ))
            }
        }
    }
}

/// Sets libtorch's intra-op CPU threads; 0 keeps libtorch's default.
pub fn set_threads(threads: usize) {
    if threads > 0 {
        tch::set_num_threads(threads as i32);
    }
}

pub fn describe(d: Device) -> String {
    match d {
        Device::Cpu => format!("cpu ({} threads)", tch::get_num_threads()),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}"),
    }
}
