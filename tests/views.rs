//! The library's view API for a process that holds many images (the coming snapshotter and
//! layer store): images opened through one `Reader` share the layers they have in common,
//! and one layer is servable alone, with its own tree and bytes.

mod common;

use std::sync::Arc;

use common::*;
use imgfs::cache::Cache;
use imgfs::reference::ImageRef;
use imgfs::source::{Source, SourceOptions};
use imgfs::view::{ImageView, LayerView, Reader, ViewOptions};

async fn open(reader: &Arc<Reader>, cache: &Cache, image: &str) -> ImageView {
    let src = Source::open(&ImageRef::parse(image).unwrap(), &SourceOptions::default())
        .await
        .unwrap();
    let resolved = imgfs::fetch::resolve(cache, &src, None).await.unwrap();
    ImageView::open_in(
        reader,
        cache,
        Arc::new(src),
        &resolved,
        &ViewOptions::default(),
    )
    .await
    .unwrap()
}

#[test]
fn images_share_their_common_layer_and_a_layer_is_servable_alone() {
    let reg = registry();
    let base = FixtureLayer::gzip(&[("etc/os", b"base\n"), ("usr/lib/x", &text(300_000, 4))]);
    FixtureImage::new(
        "amd64",
        vec![base.clone(), FixtureLayer::gzip(&[("a", b"A\n")])],
    )
    .push(&reg.host, "views/a", "v1");
    FixtureImage::new("amd64", vec![base, FixtureLayer::gzip(&[("b", b"B\n")])])
        .push(&reg.host, "views/b", "v1");
    let work = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let cache = Cache::open(work.path()).unwrap();
        let reader = Reader::new(&cache, &ViewOptions::default());
        let a = open(&reader, &cache, &format!("{}/views/a:v1", reg.host)).await;
        let b = open(&reader, &cache, &format!("{}/views/b:v1", reg.host)).await;
        assert!(
            Arc::ptr_eq(&a.layers[0], &b.layers[0]),
            "the base layer is held once"
        );
        assert!(!Arc::ptr_eq(&a.layers[1], &b.layers[1]));

        let alone = LayerView::new(b.layers[1].clone(), reader.clone()).unwrap();
        let d = alone.tree.lookup(b"b").unwrap();
        let ino = alone.tree.dentries[d as usize].inode;
        assert!(
            alone.tree.lookup(b"etc/os").is_none(),
            "only the layer's own files"
        );
        let base_alone = LayerView::new(a.layers[0].clone(), reader.clone()).unwrap();
        let x = base_alone.tree.lookup(b"usr/lib/x").unwrap();
        let x_ino = base_alone.tree.dentries[x as usize].inode;
        let (got_b, got_x) = tokio::task::spawn_blocking(move || {
            (
                alone.read(ino, 0, 100).unwrap(),
                base_alone.read(x_ino, 1000, 5000).unwrap(),
            )
        })
        .await
        .unwrap();
        assert_eq!(&got_b[..], b"B\n");
        assert_eq!(&got_x[..], &text(300_000, 4)[1000..6000]);
    });
}
