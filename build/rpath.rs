// Shared build script for every crate that links libtorch: bakes torch's
// `lib/` folder (reported by torch-sys as DEP_TCH_LIBTORCH_LIB) into the
// rpath of the crate's binaries and tests, so nobody sets LD_LIBRARY_PATH.
// Cargo passes DEP_TCH_LIBTORCH_LIB only to a crate that depends on
// torch-sys directly, so a build without libtorch (deadbolt-cli with
// --no-default-features: its torch-sys is optional) adds no link argument.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    }
}
