//! Test harness: a real registry (Debian's `docker-registry`) on a free 127.0.0.1 port, fixture
//! images built here from deterministic tar streams, and a helper to run the `imgfs` binary.
#![allow(dead_code)]

pub mod compare;
pub mod containerd;
pub mod estargz;
pub mod fixtures;
pub mod layers;
pub mod mounted;
pub mod proxy;
pub mod schema1;
pub mod show;
pub mod token;

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flate2::write::GzEncoder;
use imgfs::digest::Digest;
use imgfs::manifest::media;
use imgfs::registry::{Client, ClientOptions};
use serde_json::json;

/// A free loopback port (the small race with another binder is acceptable in tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How a test registry authenticates.
pub enum RegistryAuth {
    None,
    /// htpasswd file with bcrypt entries.
    Htpasswd(PathBuf),
    /// Token auth: realm URL, service, issuer, PEM bundle of the token signer's certificate.
    Token {
        realm: String,
        service: String,
        issuer: String,
        cert_pem: PathBuf,
    },
}

/// A running `docker-registry` with its own storage. It dies with the test process: it is
/// started under a shell that kills it when its stdin (a pipe from us) closes.
pub struct Registry {
    pub host: String,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Registry {
    pub fn start(auth: RegistryAuth) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let auth_yaml = match &auth {
            RegistryAuth::None => String::new(),
            RegistryAuth::Htpasswd(p) => format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                p.display()
            ),
            RegistryAuth::Token {
                realm,
                service,
                issuer,
                cert_pem,
            } => format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
                cert_pem.display()
            ),
        };
        let cfg = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n\
             compatibility:\n  schema1:\n    enabled: true\n{auth_yaml}",
            dir.path().join("data").display()
        );
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"docker-registry serve "$1" & p=$!; read _; kill $p"#)
            .arg("sh")
            .arg(&cfg_path)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry must be installed (scripts/test installs it)");
        let host = format!("127.0.0.1:{port}");
        wait_for_port(&host, dir.path());
        Registry { host, dir, child }
    }

    /// Path of a blob's bytes in the registry's filesystem storage (to corrupt it on purpose).
    pub fn blob_data_path(&self, d: &Digest) -> PathBuf {
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&d.hex()[..2])
            .join(d.hex())
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Closing the shell's stdin makes it kill the registry.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

fn wait_for_port(host: &str, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(host).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "registry on {host} did not start: {}",
        std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
    );
}

/// The anonymous registry shared by all tests of one test binary.
pub fn registry() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(|| Registry::start(RegistryAuth::None))
}

/// A tokio runtime for the tests' own async calls (pushing fixtures).
pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Runtime::new().unwrap())
}

/// Run `imgfs` with its own cache directory and return what it printed.
pub fn imgfs(cache: &Path, args: &[&str]) -> Output {
    imgfs_env(cache, args, &[])
}

pub fn imgfs_env(cache: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imgfs"));
    cmd.arg("--cache-dir").arg(cache).args(args);
    // Keep tests independent of the runner's credentials.
    cmd.env("DOCKER_CONFIG", cache.join("no-docker-config"));
    cmd.env("REGISTRY_AUTH_FILE", cache.join("no-auth.json"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// Run and require success; returns stdout.
pub fn imgfs_ok(cache: &Path, args: &[&str]) -> String {
    let out = imgfs(cache, args);
    assert!(
        out.status.success(),
        "imgfs {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Run and require failure with one line on stderr; returns that line.
pub fn imgfs_err(cache: &Path, args: &[&str]) -> String {
    let out = imgfs(cache, args);
    assert!(!out.status.success(), "imgfs {args:?} should have failed");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "errors are one line, got: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

pub fn inspect_json(cache: &Path, image: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["inspect", "--json", image];
    args.extend_from_slice(extra);
    serde_json::from_str(&imgfs_ok(cache, &args)).unwrap()
}

pub fn layer_digests(v: &serde_json::Value) -> Vec<String> {
    v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

// ---------- fixtures ----------

/// A deterministic tar of regular files (mode 0644, uid 0, mtime fixed).
pub fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// One layer: its blob as stored, media type and the digest of its tar.
#[derive(Clone)]
pub struct FixtureLayer {
    pub blob: Vec<u8>,
    pub media_type: &'static str,
    pub diff_id: Digest,
    /// Descriptor annotations (eStargz's TOC digest).
    pub annotations: serde_json::Map<String, serde_json::Value>,
}

impl FixtureLayer {
    pub fn gzip(files: &[(&str, &[u8])]) -> FixtureLayer {
        let tar = tar_of(files);
        FixtureLayer {
            diff_id: Digest::of(&tar),
            annotations: Default::default(),
            blob: gzip(&tar),
            media_type: media::OCI_LAYER_GZIP,
        }
    }
    /// A gzip layer from a hand-built tar.
    pub fn from_tar(tar: Vec<u8>) -> FixtureLayer {
        FixtureLayer {
            diff_id: Digest::of(&tar),
            annotations: Default::default(),
            blob: gzip(&tar),
            media_type: media::OCI_LAYER_GZIP,
        }
    }

    pub fn zstd_from_tar(tar: Vec<u8>) -> FixtureLayer {
        FixtureLayer {
            diff_id: Digest::of(&tar),
            annotations: Default::default(),
            blob: zstd::encode_all(&tar[..], 3).unwrap(),
            media_type: media::OCI_LAYER_ZSTD,
        }
    }

    pub fn plain_tar(tar: Vec<u8>) -> FixtureLayer {
        FixtureLayer {
            diff_id: Digest::of(&tar),
            annotations: Default::default(),
            blob: tar,
            media_type: media::OCI_LAYER_TAR,
        }
    }

    pub fn plain(files: &[(&str, &[u8])]) -> FixtureLayer {
        let tar = tar_of(files);
        FixtureLayer {
            diff_id: Digest::of(&tar),
            annotations: Default::default(),
            blob: tar,
            media_type: media::OCI_LAYER_TAR,
        }
    }
    pub fn digest(&self) -> Digest {
        Digest::of(&self.blob)
    }
}

/// A single-platform image: config and manifest bytes, built deterministically.
pub struct FixtureImage {
    pub layers: Vec<FixtureLayer>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
    pub manifest_media_type: &'static str,
}

impl FixtureImage {
    pub fn new(arch: &str, layers: Vec<FixtureLayer>) -> FixtureImage {
        Self::with_media_types(arch, layers, media::OCI_MANIFEST, media::OCI_CONFIG)
    }

    pub fn docker(arch: &str, layers: Vec<FixtureLayer>) -> FixtureImage {
        Self::with_media_types(arch, layers, media::DOCKER_MANIFEST, media::DOCKER_CONFIG)
    }

    fn with_media_types(
        arch: &str,
        layers: Vec<FixtureLayer>,
        manifest_mt: &'static str,
        config_mt: &str,
    ) -> FixtureImage {
        let config = serde_json::to_vec(&json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Env": ["PATH=/usr/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>()},
            "history": layers.iter().map(|_| json!({"created_by": "imgfs test"})).collect::<Vec<_>>(),
        }))
        .unwrap();
        let layer_mt = |l: &FixtureLayer| {
            if manifest_mt == media::DOCKER_MANIFEST {
                if l.media_type == media::OCI_LAYER_GZIP {
                    media::DOCKER_LAYER_GZIP
                } else {
                    media::DOCKER_LAYER_TAR
                }
            } else {
                l.media_type
            }
        };
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": manifest_mt,
            "config": {"mediaType": config_mt, "digest": Digest::of(&config).to_string(), "size": config.len()},
            "layers": layers.iter().map(|l| {
                let mut d = json!({
                    "mediaType": layer_mt(l), "digest": l.digest().to_string(), "size": l.blob.len()
                });
                if !l.annotations.is_empty() {
                    d["annotations"] = serde_json::Value::Object(l.annotations.clone());
                }
                d
            }).collect::<Vec<_>>(),
        }))
        .unwrap();
        FixtureImage {
            layers,
            config,
            manifest,
            manifest_media_type: manifest_mt,
        }
    }

    pub fn digest(&self) -> Digest {
        Digest::of(&self.manifest)
    }

    /// Push blobs and manifest to `host/repo:tag`.
    pub fn push(&self, host: &str, repo: &str, tag: &str) -> Digest {
        self.push_with(host, repo, tag, ClientOptions::default())
    }

    pub fn push_with(&self, host: &str, repo: &str, tag: &str, opts: ClientOptions) -> Digest {
        rt().block_on(async {
            let c = Client::new(opts).unwrap();
            for l in &self.layers {
                c.push_blob(host, repo, Bytes::from(l.blob.clone()))
                    .await
                    .unwrap();
            }
            c.push_blob(host, repo, Bytes::from(self.config.clone()))
                .await
                .unwrap();
            c.push_manifest(
                host,
                repo,
                tag,
                self.manifest_media_type,
                Bytes::from(self.manifest.clone()),
            )
            .await
            .unwrap()
        })
    }

    /// Write an OCI image layout holding this image under `tag`.
    pub fn write_layout(&self, dir: &Path, tag: &str) {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let put = |b: &[u8]| std::fs::write(blobs.join(Digest::of(b).hex()), b).unwrap();
        for l in &self.layers {
            put(&l.blob);
        }
        put(&self.config);
        put(&self.manifest);
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let index = json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_INDEX,
            "manifests": [{
                "mediaType": self.manifest_media_type,
                "digest": self.digest().to_string(),
                "size": self.manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        });
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    }
}

/// Push a two-platform OCI index of `images` (arch → image) as `host/repo:tag`.
pub fn push_index(
    host: &str,
    repo: &str,
    tag: &str,
    images: &[(&str, Option<&str>, &FixtureImage)],
) -> Digest {
    let mut manifests = Vec::new();
    for (arch, variant, img) in images {
        let d = img.push(host, repo, &img.digest().to_string());
        let mut platform = json!({"os": "linux", "architecture": arch});
        if let Some(v) = variant {
            platform["variant"] = json!(v);
        }
        manifests.push(json!({
            "mediaType": img.manifest_media_type, "digest": d.to_string(),
            "size": img.manifest.len(), "platform": platform,
        }));
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": manifests,
    }))
    .unwrap();
    rt().block_on(async {
        Client::new(ClientOptions::default())
            .unwrap()
            .push_manifest(host, repo, tag, media::OCI_INDEX, Bytes::from(index))
            .await
            .unwrap()
    })
}

fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Incompressible, deterministic bytes, so a gzip layer is as large as its data.
pub fn noise(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n).map(|_| xorshift(&mut seed) as u8).collect()
}

/// Compressible, deterministic bytes (four letters at random: gzip gets about 4:1).
pub fn text(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| b'a' + (xorshift(&mut seed) % 4) as u8)
        .collect()
}

/// How many entries directory `dir` holds (0 if it does not exist).
/// Ask a daemon a test started to stop (SIGTERM) and give it up to 10 s; true if it exited.
/// The caller kills and reaps one that did not.
pub fn terminate(child: &mut Child) -> bool {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

pub fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// Nothing in `cache` has a name it does not deserve: blobs and chunks hash to their names,
/// and every index decodes as the index of the layer it is named after. (Temporary files of
/// a killed process may remain in tmp/, unnamed.)
pub fn assert_cache_names_verify(cache: &Path) {
    fn sha256(b: &[u8]) -> String {
        Digest::of(b).hex().to_string()
    }
    fn blake3(b: &[u8]) -> String {
        imgfs::digest::SpanDigest::of(b).hex()
    }
    type NameOf = fn(&[u8]) -> String;
    let named: [(&str, NameOf); 3] = [
        ("blobs/sha256", sha256),
        ("chunks/sha256", sha256),
        ("chunks/blake3", blake3),
    ];
    for (dir, name_of) in named {
        for e in std::fs::read_dir(cache.join(dir)).into_iter().flatten() {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap();
            assert_eq!(
                name_of(&bytes),
                e.file_name().to_string_lossy(),
                "{}",
                e.path().display()
            );
        }
    }
    for e in std::fs::read_dir(cache.join("indexes/sha256"))
        .into_iter()
        .flatten()
    {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let layer =
            Digest::parse(&format!("sha256:{}", name.trim_end_matches(".published"))).unwrap();
        imgfs::index::codec::decode(&layer, &std::fs::read(e.path()).unwrap()).unwrap();
    }
}

/// Build directories of `imgfs pull` in `dir` (there should be none once a pull ended).
pub fn pull_build_dirs(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".imgfs-pull-"))
        .collect()
}

/// Run a command that must succeed, its output in the panic message.
pub fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `skopeo copy` the image to a layout and `umoci unpack` it; returns the rootfs.
pub fn umoci_unpack(image: &str, work: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(work).unwrap();
    let layout = work.join("layout");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{image}"),
        &format!("oci:{}:ref", layout.display()),
    ]));
    let bundle = work.join("bundle");
    run_ok(Command::new("umoci").args([
        "unpack",
        "--image",
        &format!("{}:ref", layout.display()),
        bundle.to_str().unwrap(),
    ]));
    bundle.join("rootfs")
}
