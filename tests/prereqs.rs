//! The build-prerequisite check of `scripts/prereqs.sh` on fake library trees:
//! it must accept exactly the file names bindgen's loader (clang-sys) loads as
//! libclang, and never Debian's `libclang-cpp.so.N` (the C++ API, often
//! installed alone), which once made a fresh machine skip the install and fail
//! its first build.

use std::path::Path;
use std::process::Command;

/// Runs `prereqs.sh --check-libclang` over `dirs` only; returns (found, stdout).
fn check(dirs: &[&Path]) -> (bool, String) {
    let joined = dirs.iter().map(|d| d.to_str().expect("utf-8 temp path")).collect::<Vec<_>>().join(":");
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/prereqs.sh"))
        .arg("--check-libclang")
        .env("RIM_LIBCLANG_DIRS", joined)
        .output()
        .expect("run scripts/prereqs.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.code() == Some(0) || out.status.code() == Some(1),
        "unexpected exit {:?}: {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), stdout)
}

/// A temp dir holding empty files with these names.
fn tree(files: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for f in files {
        std::fs::write(dir.path().join(f), b"").expect("fake library");
    }
    dir
}

#[test]
fn libclang_cpp_alone_is_not_libclang() {
    let t = tree(&["libclang-cpp.so.14", "libclang-cpp.so", "libclangBasic.a"]);
    let (found, out) = check(&[t.path()]);
    assert!(!found, "libclang-cpp taken for libclang: {out}");
    assert_eq!(out.trim(), "libclang: missing");
}

#[test]
fn nothing_is_missing() {
    let t = tree(&[]);
    let (found, out) = check(&[t.path()]);
    assert!(!found, "{out}");
}

#[test]
fn suffix_versioned_libclang_is_found() {
    let t = tree(&["libclang-cpp.so.14", "libclang.so.1"]);
    let (found, out) = check(&[t.path()]);
    assert!(found, "{out}");
    assert!(out.trim().ends_with("/libclang.so.1"), "{out}");
}

#[test]
fn every_name_bindgen_loads_is_found() {
    for name in
        ["libclang.so", "libclang-14.so", "libclang-14.0.6.so", "libclang.so.14.0.6", "libclang-14.so.1"]
    {
        let t = tree(&[name]);
        let (found, out) = check(&[t.path()]);
        assert!(found, "{name} not found: {out}");
        assert!(out.trim().ends_with(name), "{name}: {out}");
    }
}

#[test]
fn later_directories_are_searched() {
    let cpp_only = tree(&["libclang-cpp.so.14"]);
    let real = tree(&["libclang-14.so.1"]);
    let (found, out) = check(&[Path::new("/nonexistent/rim"), cpp_only.path(), real.path()]);
    assert!(found, "{out}");
    assert!(out.contains(real.path().to_str().unwrap()), "{out}");
}
