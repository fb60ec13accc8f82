// Shared build script for every crate that links libtorch: bakes torch's
// `lib/` folder (reported by torch-sys as DEP_TCH_LIBTORCH_LIB) into the
// rpath of the crate's binaries and tests, so nobody sets LD_LIBRARY_PATH.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    }
}
