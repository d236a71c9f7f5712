//! The snapshots.v1 gRPC service over a [`Snapshotter`]: requests to the model's calls, run
//! on the blocking pool (the state commits with an fsync, and resolving a lazy layer waits
//! for the registry), and the model's errors to the gRPC codes containerd reads them by
//! (errdefs: NotFound, AlreadyExists, InvalidArgument, FailedPrecondition; the rest Unknown).

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tonic::{Request, Response, Status};

use super::api::snapshots::snapshots_server::{Snapshots, SnapshotsServer};
use super::api::snapshots::{self as pb, Info};
use super::api::types;
use super::{Error, Kind, Mount, Record, Snapshotter};

/// containerd's overlayfs snapshotter lists in batches of this many.
const LIST_BATCH: usize = 100;

/// Serve `snapshotter` on the unix socket `address` (a stale socket file is replaced) until
/// `shutdown` completes.
pub async fn serve(
    snapshotter: Arc<Snapshotter>,
    address: &Path,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    match std::fs::remove_file(address) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(address)?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(Service(snapshotter)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(std::io::Error::other)
}

struct Service(Arc<Snapshotter>);

impl Service {
    /// Run `f` on the model on the blocking pool.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Snapshotter) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Status> {
        let s = self.0.clone();
        match tokio::task::spawn_blocking(move || f(&s)).await {
            Ok(r) => r.map_err(status),
            Err(e) => Err(Status::internal(format!("snapshotter task: {e}"))),
        }
    }
}

fn status(e: Error) -> Status {
    let message = e.to_string();
    match e {
        Error::NotFound(_) => Status::not_found(message),
        Error::AlreadyExists(_) => Status::already_exists(message),
        Error::InvalidArgument(_) => Status::invalid_argument(message),
        Error::FailedPrecondition(_) => Status::failed_precondition(message),
        Error::State(_) | Error::Io { .. } => Status::unknown(message),
    }
}

fn mounts(ms: Vec<Mount>) -> Vec<types::Mount> {
    ms.into_iter()
        .map(|m| types::Mount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn info(key: String, r: Record) -> Info {
    let kind = match r.kind {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    };
    let time = |nanos: i64| prost_types::Timestamp {
        seconds: nanos.div_euclid(1_000_000_000),
        nanos: nanos.rem_euclid(1_000_000_000) as i32,
    };
    Info {
        name: key,
        parent: r.parent,
        kind: kind as i32,
        created_at: Some(time(r.created)),
        updated_at: Some(time(r.updated)),
        labels: r.labels.into_iter().collect(),
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let ms = self
            .call(move |s| s.prepare(&r.key, &r.parent, r.labels))
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts(ms),
        }))
    }

    async fn view(
        &self,
        req: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let ms = self
            .call(move |s| s.view(&r.key, &r.parent, r.labels))
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(ms),
        }))
    }

    async fn mounts(
        &self,
        req: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let key = req.into_inner().key;
        let ms = self.call(move |s| s.mounts(&key)).await?;
        Ok(Response::new(pb::MountsResponse { mounts: mounts(ms) }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.call(move |s| s.commit(&r.name, &r.key, r.labels))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let key = req.into_inner().key;
        self.call(move |s| s.remove(&key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let key = req.into_inner().key;
        let r = self.call({
            let key = key.clone();
            move |s| s.stat(&key)
        });
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(key, r.await?)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let Some(i) = r.info else {
            return Err(Status::invalid_argument("update without a snapshot info"));
        };
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let key = i.name.clone();
        let rec = self
            .call({
                let key = key.clone();
                move |s| s.update(&key, i.labels, &paths)
            })
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info(key, rec)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<ListStream>, Status> {
        let filters = req.into_inner().filters;
        let all = self.call(move |s| s.list(&filters)).await?;
        let infos: Vec<Info> = all.into_iter().map(|(k, r)| info(k, r)).collect();
        let batches: Vec<Result<pb::ListSnapshotsResponse, Status>> = infos
            .chunks(LIST_BATCH)
            .map(|c| Ok(pb::ListSnapshotsResponse { info: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(futures_util::stream::iter(batches))))
    }

    async fn usage(
        &self,
        req: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let key = req.into_inner().key;
        let (size, inodes) = self.call(move |s| s.usage(&key)).await?;
        Ok(Response::new(pb::UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.call(|s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}
