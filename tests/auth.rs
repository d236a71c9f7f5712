//! Authentication against real registries: basic auth (htpasswd) with credentials from the
//! docker config, a credential helper and podman's auth.json; bearer tokens from a token server.

mod common;

use std::path::Path;

use base64::Engine as _;
use common::token::{ISSUER, SERVICE, TokenServer};
use common::*;

fn htpasswd_registry() -> Registry {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("htpasswd")
        .args(["-Bbn", "user", "pass"])
        .output()
        .expect("htpasswd (apache2-utils) must be installed");
    let file = dir.keep().join("htpasswd");
    std::fs::write(&file, out.stdout).unwrap();
    Registry::start(RegistryAuth::Htpasswd(file))
}

fn write_docker_config(dir: &Path, json: serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
}

fn auth_entry(user: &str, pass: &str) -> serde_json::Value {
    serde_json::json!({"auth": base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))})
}

#[test]
fn basic_auth_with_every_credential_source() {
    let reg = htpasswd_registry();
    let img = FixtureImage::new("amd64", vec![FixtureLayer::gzip(&[("f", b"basic")])]);
    let cfg = tempfile::tempdir().unwrap();
    let good = cfg.path().join("good");
    write_docker_config(
        &good,
        serde_json::json!({"auths": {reg.host.clone(): auth_entry("user", "pass")}}),
    );
    let mut opts = imgfs::registry::ClientOptions::default();
    opts.credentials.insert(
        reg.host.clone(),
        imgfs::registry::auth::Credential::Basic {
            username: "user".into(),
            password: "pass".into(),
        },
    );
    img.push_with(&reg.host, "private/app", "v1", opts);
    let image = format!("{}/private/app:v1", reg.host);
    let cache = tempfile::tempdir().unwrap();
    let c = cache.path();

    let err = imgfs_err(c, &["inspect", &image]);
    assert!(err.contains("user name and password"), "{err}");

    let ok = |env: &[(&str, &str)]| {
        let out = imgfs_env(c, &["inspect", "--json", &image], env);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["digest"], img.digest().to_string());
    };
    ok(&[("DOCKER_CONFIG", good.to_str().unwrap())]);

    let bad = cfg.path().join("bad");
    write_docker_config(
        &bad,
        serde_json::json!({"auths": {reg.host.clone(): auth_entry("user", "wrong")}}),
    );
    let out = imgfs_env(
        c,
        &["inspect", &image],
        &[("DOCKER_CONFIG", bad.to_str().unwrap())],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("authentication failed"),
        "{err}"
    );

    // A credential helper named in credHelpers, found on PATH.
    let helper_dir = cfg.path().join("bin");
    std::fs::create_dir_all(&helper_dir).unwrap();
    let helper = helper_dir.join("docker-credential-imgfstest");
    std::fs::write(
        &helper,
        "#!/bin/sh\nread host\necho \"{\\\"ServerURL\\\":\\\"$host\\\",\\\"Username\\\":\\\"user\\\",\\\"Secret\\\":\\\"pass\\\"}\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let helped = cfg.path().join("helped");
    write_docker_config(
        &helped,
        serde_json::json!({"credHelpers": {reg.host.clone(): "imgfstest"}}),
    );
    let path = format!(
        "{}:{}",
        helper_dir.display(),
        std::env::var("PATH").unwrap()
    );
    ok(&[("DOCKER_CONFIG", helped.to_str().unwrap()), ("PATH", &path)]);

    // podman's auth.json.
    let auth_json = cfg.path().join("auth.json");
    std::fs::write(
        &auth_json,
        serde_json::json!({"auths": {reg.host.clone(): auth_entry("user", "pass")}}).to_string(),
    )
    .unwrap();
    ok(&[("REGISTRY_AUTH_FILE", auth_json.to_str().unwrap())]);
}

fn token_registry(ts: &TokenServer) -> Registry {
    Registry::start(RegistryAuth::Token {
        realm: ts.realm.clone(),
        service: SERVICE.into(),
        issuer: ISSUER.into(),
        cert_pem: ts.cert_pem.clone(),
    })
}

#[test]
fn bearer_tokens_are_fetched_cached_and_refreshed() {
    let ts = TokenServer::start();
    let reg = token_registry(&ts);
    let img = FixtureImage::new("amd64", vec![FixtureLayer::gzip(&[("f", b"bearer")])]);
    img.push(&reg.host, "tok/app", "v1");
    let image = format!("{}/tok/app:v1", reg.host);
    let cache = tempfile::tempdir().unwrap();

    let before = ts.issued();
    let v = inspect_json(cache.path(), &image, &[]);
    assert_eq!(v["digest"], img.digest().to_string());
    imgfs_ok(cache.path(), &["fetch", &image]);
    assert!(ts.issued() > before);

    // One token serves a whole command (manifest + config + layers) while it is fresh...
    let before = ts.issued();
    let fresh = tempfile::tempdir().unwrap();
    imgfs_ok(fresh.path(), &["fetch", &image]);
    assert_eq!(ts.issued() - before, 1, "one token for one scope");

    // ...and a new one is fetched once it expires.
    ts.set_expires_in(1);
    rt().block_on(async {
        let c = imgfs::registry::Client::new(Default::default()).unwrap();
        c.get_manifest(&reg.host, "tok/app", "v1").await.unwrap();
        let n = ts.issued();
        c.get_manifest(&reg.host, "tok/app", "v1").await.unwrap();
        assert_eq!(ts.issued(), n, "still fresh: reused");
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        c.get_manifest(&reg.host, "tok/app", "v1").await.unwrap();
        assert_eq!(ts.issued(), n + 1, "expired: refreshed");
    });
    ts.set_expires_in(300);

    // Publishing layer indexes goes through the same auth, with a pull,push token; another
    // machine then mounts from them.
    let out = imgfs_ok(cache.path(), &["index", "push", &image]);
    assert!(out.contains("pushed index artifact"), "{out}");
    let other = tempfile::tempdir().unwrap();
    imgfs_ok(other.path(), &["ls", &image]);
    let published = format!("{}.published", img.layers[0].digest().hex());
    assert!(
        other
            .path()
            .join("indexes/sha256")
            .join(published)
            .is_file()
    );

    // A token server that wants a login says so through imgfs.
    ts.require_login(true);
    let err = imgfs_err(tempfile::tempdir().unwrap().path(), &["inspect", &image]);
    assert!(err.contains("token server") && err.contains("401"), "{err}");
    let cfg = tempfile::tempdir().unwrap();
    write_docker_config(
        cfg.path(),
        serde_json::json!({"auths": {reg.host.clone(): auth_entry("user", "pass")}}),
    );
    let out = imgfs_env(
        tempfile::tempdir().unwrap().path(),
        &["inspect", &image],
        &[("DOCKER_CONFIG", cfg.path().to_str().unwrap())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn credentials_do_not_follow_a_redirect_to_blob_storage() {
    let reg = htpasswd_registry();
    let img = FixtureImage::new("amd64", vec![FixtureLayer::gzip(&[("f", b"redirected")])]);
    let mut opts = imgfs::registry::ClientOptions::default();
    opts.credentials.insert(
        reg.host.clone(),
        imgfs::registry::auth::Credential::Basic {
            username: "user".into(),
            password: "pass".into(),
        },
    );
    img.push_with(&reg.host, "private/redirect", "v1", opts);
    let store = proxy::BlobStore::start(vec![
        (
            img.layers[0].digest().to_string(),
            img.layers[0].blob.clone(),
        ),
        (
            imgfs::digest::Digest::of(&img.config).to_string(),
            img.config.clone(),
        ),
    ]);
    let proxy = proxy::Proxy::start(&reg.host);
    proxy.redirect_blobs_to(&store.base);

    let cfg = tempfile::tempdir().unwrap();
    write_docker_config(
        cfg.path(),
        serde_json::json!({"auths": {proxy.host.clone(): auth_entry("user", "pass")}}),
    );
    let cache = tempfile::tempdir().unwrap();
    let out = imgfs_env(
        cache.path(),
        &["fetch", &format!("{}/private/redirect:v1", proxy.host)],
        &[("DOCKER_CONFIG", cfg.path().to_str().unwrap())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(store.served(), 2, "config and layer came from blob storage");
    assert!(
        store.auth_seen().is_empty(),
        "registry credentials leaked to another host: {:?}",
        store.auth_seen()
    );
    assert!(
        proxy.log().iter().any(|l| l.contains("/manifests/")),
        "the manifest still came through the registry"
    );
}
