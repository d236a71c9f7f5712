//! A container's view of two layers: a static program that prints files from both, a file the
//! upper layer whited out and an opaque directory's listing, and the two layers holding it —
//! what the runtime tests (podman through the layer store, containerd through the
//! snapshotter) run and check.

use std::path::Path;
use std::process::Command;

use super::FixtureLayer;
use super::layers::Tar;

/// What `/bin/show` prints in a container of [`two_layers`].
pub const SHOWN: &str = "/etc/base: from the lower layer\n/etc/top: from the upper layer\n/etc/gone: absent\nopq: new\n";

/// A static program that prints what the test checks: files from both layers, a whited-out
/// file, an opaque directory's listing.
const SHOW_C: &str = r#"
#include <stdio.h>
#include <dirent.h>
static void show(const char *p) {
    FILE *f = fopen(p, "r");
    char buf[256];
    if (!f) { printf("%s: absent\n", p); return; }
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = 0;
    printf("%s: %s", p, buf);
    fclose(f);
}
int main(void) {
    show("/etc/base"); show("/etc/top"); show("/etc/gone");
    DIR *d = opendir("/opq");
    struct dirent *e;
    while (d && (e = readdir(d))) if (e->d_name[0] != '.') printf("opq: %s\n", e->d_name);
    return 0;
}
"#;

pub fn show_binary(work: &Path) -> Vec<u8> {
    let src = work.join("show.c");
    let bin = work.join("show");
    std::fs::write(&src, SHOW_C).unwrap();
    let ok = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .unwrap();
    assert!(ok.success(), "cc -static");
    std::fs::read(bin).unwrap()
}

/// Two layers: the lower has a program and files, the upper a new file, a whiteout of one
/// of them and an opaque directory.
pub fn two_layers(program: &[u8]) -> (FixtureLayer, FixtureLayer) {
    let lower = Tar::new()
        .dir("bin", 0o755)
        .file("bin/show", 0o755, program)
        .dir("etc", 0o755)
        .file("etc/base", 0o644, b"from the lower layer\n")
        .file("etc/gone", 0o644, b"whited out above\n")
        .dir("opq", 0o755)
        .file("opq/old", 0o644, b"hidden by the opaque dir\n")
        .bytes();
    let upper = Tar::new()
        .dir("etc", 0o755)
        .file("etc/top", 0o644, b"from the upper layer\n")
        .whiteout("etc/gone")
        .dir("opq", 0o711)
        .opaque("opq")
        .file("opq/new", 0o644, b"new\n")
        .bytes();
    (FixtureLayer::from_tar(lower), FixtureLayer::from_tar(upper))
}
