use super::*;
use crate::index::LayerIndex;

fn e(path: &str, kind: Kind) -> Entry {
    Entry {
        path: path.into(),
        kind,
        mode: if kind == Kind::Dir { 0o755 } else { 0o644 },
        uid: 0,
        gid: 0,
        size: 0,
        mtime: 0,
        link: None,
        dev_major: 0,
        dev_minor: 0,
        xattrs: vec![],
        offset: 0,
        sparse: vec![],
    }
}

fn link(path: &str, kind: Kind, target: &str) -> Entry {
    Entry {
        link: Some(target.into()),
        ..e(path, kind)
    }
}

fn layer(entries: Vec<Entry>) -> LayerIndex {
    LayerIndex {
        entries,
        seek: None,
    }
}

fn paths(t: &Tree) -> Vec<String> {
    t.walk()
        .into_iter()
        .map(|d| t.path(d).to_string())
        .collect()
}

fn merged(layers: &[LayerIndex]) -> Tree {
    let refs: Vec<&LayerIndex> = layers.iter().collect();
    merge(&refs, &[]).unwrap()
}

#[test]
fn whiteouts_hide_lower_layers_only_whatever_their_order() {
    let t = merged(&[
        layer(vec![
            e("a", Kind::Dir),
            e("a/x", Kind::File),
            e("a/y", Kind::File),
        ]),
        layer(vec![
            e("a/x", Kind::File), // re-added in the same layer, before its whiteout
            e("a/x", Kind::Whiteout),
            e("a/y", Kind::Whiteout),
        ]),
    ]);
    assert_eq!(paths(&t), vec!["a", "a/x"]);
    let x = t.lookup(b"a/x").unwrap();
    assert_eq!(t.inode_of(x).data, Some(DataRef { layer: 1, entry: 0 }));
}

#[test]
fn opaque_directories_drop_lower_children_and_keep_their_own() {
    let t = merged(&[
        layer(vec![
            e("d", Kind::Dir),
            e("d/old", Kind::File),
            e("d/sub", Kind::Dir),
            e("d/sub/f", Kind::File),
        ]),
        layer(vec![e("d/new", Kind::File), e("d", Kind::Opaque)]),
    ]);
    assert_eq!(paths(&t), vec!["d", "d/new"]);
}

#[test]
fn files_and_directories_replace_each_other() {
    let t = merged(&[
        layer(vec![
            e("p", Kind::Dir),
            e("p/child", Kind::File),
            e("q", Kind::File),
        ]),
        layer(vec![
            e("p", Kind::File),
            e("q", Kind::Dir),
            e("q/in", Kind::File),
        ]),
    ]);
    assert_eq!(paths(&t), vec!["p", "q", "q/in"]);
    assert_eq!(t.inode_of(t.lookup(b"p").unwrap()).meta.kind, Kind::File);

    // A directory over a directory merges and takes the new metadata.
    let mut upper = e("p", Kind::Dir);
    upper.mode = 0o700;
    let t = merged(&[
        layer(vec![e("p", Kind::Dir), e("p/keep", Kind::File)]),
        layer(vec![upper, e("p/add", Kind::File)]),
    ]);
    assert_eq!(paths(&t), vec!["p", "p/add", "p/keep"]);
    assert_eq!(t.inode_of(t.lookup(b"p").unwrap()).meta.mode, 0o700);
}

#[test]
fn hardlinks_share_the_inode_the_target_had_when_linked() {
    let t = merged(&[
        layer(vec![e("t", Kind::File)]),
        layer(vec![
            link("h", Kind::Hardlink, "t"),
            link("h2", Kind::Hardlink, "h"),
        ]),
        layer(vec![e("t", Kind::File)]), // overwrites t: h keeps the old bytes
    ]);
    let h = t.inode_of(t.lookup(b"h").unwrap());
    assert_eq!(h.data, Some(DataRef { layer: 0, entry: 0 }));
    assert_eq!(h.nlink, 2, "h and h2");
    let tt = t.inode_of(t.lookup(b"t").unwrap());
    assert_eq!(tt.data, Some(DataRef { layer: 2, entry: 0 }));
    assert_eq!(tt.nlink, 1);

    // Deleting the target keeps the link.
    let t = merged(&[
        layer(vec![e("t", Kind::File), link("h", Kind::Hardlink, "t")]),
        layer(vec![e("t", Kind::Whiteout)]),
    ]);
    assert_eq!(paths(&t), vec!["h"]);
    assert_eq!(t.inode_of(t.lookup(b"h").unwrap()).nlink, 1);
}

#[test]
fn parents_resolve_through_symlinks_inside_the_root() {
    let t = merged(&[
        layer(vec![
            e("usr", Kind::Dir),
            e("usr/lib", Kind::Dir),
            link("lib", Kind::Symlink, "usr/lib"),
            link("abs", Kind::Symlink, "/usr/lib"),
            link("escape", Kind::Symlink, "../../../../tmp"),
        ]),
        layer(vec![
            e("lib/a", Kind::File),
            e("abs/b", Kind::File),
            e("escape/c", Kind::File),
        ]),
    ]);
    assert!(t.lookup(b"usr/lib/a").is_some());
    assert!(t.lookup(b"usr/lib/b").is_some());
    // `..` stops at the root: "escape" means /tmp inside the image.
    assert!(t.lookup(b"tmp/c").is_some());
    assert_eq!(
        t.inode_of(t.lookup(b"lib").unwrap()).meta.kind,
        Kind::Symlink
    );
}

#[test]
fn malformed_layers_are_refused_naming_the_entry() {
    let refs = [layer(vec![e("f", Kind::File), e("f/under", Kind::File)])];
    let err = merge(&refs.iter().collect::<Vec<_>>(), &["sha256:abc".into()])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"f/under\"")
            && err.contains("not a directory")
            && err.contains("sha256:abc"),
        "{err}"
    );

    let refs = [layer(vec![link("h", Kind::Hardlink, "missing")])];
    let err = merge(&refs.iter().collect::<Vec<_>>(), &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"missing\"") && err.contains("does not exist"),
        "{err}"
    );

    let refs = [layer(vec![
        link("a", Kind::Symlink, "b"),
        link("b", Kind::Symlink, "a"),
        e("a/x", Kind::File),
    ])];
    let err = merge(&refs.iter().collect::<Vec<_>>(), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("symbolic links"), "{err}");
}

#[test]
fn deep_paths_resolve_in_linear_time_and_missing_parents_appear_inside_symlink_targets() {
    let deep = (0..5000)
        .map(|i| format!("d{i}"))
        .collect::<Vec<_>>()
        .join("/");
    let started = std::time::Instant::now();
    let t = merged(&[layer(vec![e(&format!("{deep}/f"), Kind::File)])]);
    assert!(t.lookup(format!("{deep}/f").as_bytes()).is_some());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let t = merged(&[
        layer(vec![link("a", Kind::Symlink, "x/y")]),
        layer(vec![e("a/b/c", Kind::File)]),
    ]);
    assert!(t.lookup(b"x/y/b/c").is_some(), "{:?}", paths(&t));
}

#[test]
fn a_path_merged_alone_resolves_as_in_the_whole_tree() {
    let layers = [
        layer(vec![
            e("a", Kind::Dir),
            e("a/b", Kind::Dir),
            e("a/b/f", Kind::File),
            e("a/b/g", Kind::File),
            e("gone", Kind::Dir),
            e("gone/f", Kind::File),
            e("opq", Kind::Dir),
            e("opq/f", Kind::File),
            e("d2f", Kind::Dir),
            e("d2f/f", Kind::File),
            e("other/x", Kind::File),
        ]),
        layer(vec![
            e("a/b/g", Kind::File),
            e("gone", Kind::Whiteout),
            e("opq", Kind::Opaque),
            e("d2f", Kind::File),
        ]),
    ];
    let refs: Vec<&LayerIndex> = layers.iter().collect();
    let full = merge(&refs, &[]).unwrap();
    for p in [
        "a/b/f", "a/b/g", "gone/f", "opq/f", "d2f/f", "d2f", "other/x", "a", "nope",
    ] {
        let p = p.as_bytes();
        let alone = merge_for_path(&refs, &[], p).expect("no links").unwrap();
        let want = full.lookup(p).map(|d| full.inode_of(d).data);
        let got = alone.lookup(p).map(|d| alone.inode_of(d).data);
        assert_eq!(got, want, "{:?}", p.as_bstr());
    }
    // A symlink on the way needs the whole tree.
    let with_link = [layer(vec![
        link("l", Kind::Symlink, "a"),
        e("a/f", Kind::File),
    ])];
    let refs: Vec<&LayerIndex> = with_link.iter().collect();
    assert!(merge_for_path(&refs, &[], b"l/f").is_none());
    // So does an entry written through a symlink elsewhere (usrmerge bases).
    let through = [
        layer(vec![
            e("usr", Kind::Dir),
            e("usr/lib", Kind::Dir),
            e("usr/lib/f", Kind::File),
            link("lib", Kind::Symlink, "usr/lib"),
        ]),
        layer(vec![e("lib/f", Kind::File)]),
    ];
    let refs: Vec<&LayerIndex> = through.iter().collect();
    assert!(merge_for_path(&refs, &[], b"usr/lib/f").is_none());
}

#[test]
fn a_hard_link_to_a_symlink_is_a_link_on_the_way_for_a_single_path() {
    // Layer 3 deletes c/secret through h, a hard link to the symlink s -> c.
    let layers = [
        layer(vec![
            e("c", Kind::Dir),
            e("c/secret", Kind::File),
            link("s", Kind::Symlink, "c"),
        ]),
        layer(vec![link("h", Kind::Hardlink, "s")]),
        layer(vec![e("h/secret", Kind::Whiteout), e("h/f", Kind::File)]),
    ];
    let refs: Vec<&LayerIndex> = layers.iter().collect();
    let full = merge(&refs, &[]).unwrap();
    assert!(full.lookup(b"c/secret").is_none());
    assert!(full.lookup(b"c/f").is_some());
    for p in [&b"c/secret"[..], b"c/f"] {
        if let Some(alone) = merge_for_path(&refs, &[], p) {
            let alone = alone.unwrap();
            assert_eq!(
                alone.lookup(p).is_some(),
                full.lookup(p).is_some(),
                "{:?}",
                p.as_bstr()
            );
        }
    }
}

#[test]
fn merged_alone_or_in_full_every_path_is_the_same_on_generated_stacks() {
    // The fuzz target's generator, driven by a fixed pseudo-random sequence here.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..20_000 {
        let data: Vec<u8> = (0..48)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        crate::fuzz_entry::merge_agreement(&data);
    }
}
