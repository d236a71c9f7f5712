//! Fixture images shared by the pull and mount suites.

use super::layers::Tar;
use super::{FixtureImage, FixtureLayer};

/// security.capability v2 granting cap_net_raw, effective.
const CAP_NET_RAW: &[u8] = &[
    1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

pub fn rich_image() -> FixtureImage {
    let long_name = format!("data/{}", "n".repeat(150));
    let long_target = format!("/usr/{}", "t".repeat(120));
    let l1 = Tar::new()
        .dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0::/root:/bin/sh\n")
        .owned_file("etc/shadow", 0o640, 0, 42, b"root:*:1::::::\n")
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .dir("usr/lib", 0o755)
        .file("usr/bin/tool", 0o4755, b"#!/bin/sh\necho tool\n")
        .owned_file("usr/bin/grouped", 0o2755, 0, 50, b"sgid")
        .hardlink("usr/bin/tool-link", "usr/bin/tool")
        .xattr_file(
            "usr/bin/ping",
            0o755,
            b"ping",
            &[
                ("user.origin", b"fixture"),
                ("security.capability", CAP_NET_RAW),
            ],
        )
        .symlink("lib", "usr/lib")
        .symlink("bin", "/usr/bin")
        .dir("tmp", 0o1777)
        .dir("home", 0o755)
        .dir("home/user", 0o700)
        .owned_file("home/user/notes", 0o600, 1000, 1000, b"mine")
        .dir("run", 0o755)
        .fifo("run/fifo", 0o600)
        .dir("dev", 0o755)
        .chardev("dev/null", 1, 3)
        .dir("var", 0o755)
        .dir("var/cache", 0o755)
        .file("var/cache/stale", 0o644, b"deleted by layer 2")
        .dir("var/cache/gone-dir", 0o755)
        .file("var/cache/gone-dir/inner", 0o644, b"whole subtree deleted")
        .dir("data", 0o755)
        .dir("data/dir-to-file", 0o755)
        .file("data/dir-to-file/child", 0o644, b"goes with its dir")
        .file("data/file-to-dir", 0o644, b"becomes a directory")
        .file(&long_name, 0o644, b"a name longer than 100 bytes")
        .symlink("data/long-link", &long_target)
        .dir("t", 0o755)
        .file("t/target", 0o644, b"old target bytes")
        .dir("opq", 0o755)
        .file("opq/a", 0o644, b"hidden by opaque")
        .dir("opq/sub", 0o755)
        .file("opq/sub/b", 0o644, b"hidden too")
        .bytes();
    let l2 = Tar::new()
        .whiteout("var/cache/stale")
        .whiteout("var/cache/gone-dir")
        .file("data/dir-to-file", 0o600, b"was a directory")
        .dir("data/file-to-dir", 0o750)
        .file("data/file-to-dir/inside", 0o644, b"in the new dir")
        .hardlink("t/link", "t/target")
        .opaque("opq")
        .file("opq/new", 0o644, b"after opaque")
        .file("lib/libnew.so", 0o755, b"through the lib symlink")
        .dir("etc", 0o700)
        .bytes();
    let l3 = Tar::new()
        .file(
            "t/target",
            0o644,
            b"new target bytes, the link keeps the old",
        )
        .whiteout("etc/shadow")
        .owned_file("etc/passwd", 0o644, 0, 0, b"root:x:0:0::/root:/bin/bash\n")
        .file(
            "usr/bin/tool",
            0o755,
            b"tool replaced: tool-link keeps the setuid original",
        )
        .bytes();
    FixtureImage::new(
        "amd64",
        vec![
            FixtureLayer::from_tar(l1),
            // (umoci reads no zstd; zstd layers are checked against their gzip twins below.)
            FixtureLayer::from_tar(l2),
            FixtureLayer::plain_tar(l3),
        ],
    )
}
