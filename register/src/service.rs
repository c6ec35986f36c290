//! The gRPC edge: translates `longlink.register.Register` calls to [`Node`] operations and maps
//! errors to `tonic::Status` (the only place that does).

use std::sync::Arc;

use longlink_proto::registerpb;
use longlink_proto::registerpb::register_server::Register;
use longlink_proto::registerpb::register_server::RegisterServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::Response;

use crate::error::Error;
use crate::error::Result;
use crate::node::Node;
use crate::node::TooBig;

/// Largest request accepted (a Sync of a big slot); larger is refused by tonic.
const MAX_DECODE: usize = 64 << 20;

pub struct Service {
    node: Arc<Node>,
}

fn too_big(e: TooBig) -> tonic::Status {
    tonic::Status::invalid_argument(e.to_string())
}

#[tonic::async_trait]
impl Register for Service {
    async fn attach(
        &self,
        req: Request<registerpb::AttachRequest>,
    ) -> Result<Response<registerpb::AttachResponse>, tonic::Status> {
        let req = req.into_inner();
        let node = self.node.clone();
        let results = tokio::task::spawn_blocking(move || node.attach(req.epoch, &req.sessions))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .map_err(too_big)?;
        Ok(Response::new(registerpb::AttachResponse { results }))
    }

    async fn detach(
        &self,
        req: Request<registerpb::DetachRequest>,
    ) -> Result<Response<registerpb::DetachResponse>, tonic::Status> {
        let req = req.into_inner();
        let node = self.node.clone();
        let results = tokio::task::spawn_blocking(move || node.detach(req.epoch, &req.sessions))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .map_err(too_big)?;
        Ok(Response::new(registerpb::DetachResponse { results }))
    }

    async fn lookup(
        &self,
        req: Request<registerpb::LookupRequest>,
    ) -> Result<Response<registerpb::LookupResponse>, tonic::Status> {
        let req = req.into_inner();
        Ok(Response::new(
            self.node.lookup(req.epoch, &req.app, &req.user),
        ))
    }

    async fn lookup_batch(
        &self,
        req: Request<registerpb::LookupBatchRequest>,
    ) -> Result<Response<registerpb::LookupBatchResponse>, tonic::Status> {
        let req = req.into_inner();
        let node = self.node.clone();
        let results = tokio::task::spawn_blocking(move || node.lookup_batch(req.epoch, &req.users))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?
            .map_err(too_big)?;
        Ok(Response::new(registerpb::LookupBatchResponse { results }))
    }

    async fn sync(
        &self,
        req: Request<registerpb::SyncRequest>,
    ) -> Result<Response<registerpb::SyncResponse>, tonic::Status> {
        let req = req.into_inner();
        let node = self.node.clone();
        let (result, stored) = tokio::task::spawn_blocking(move || {
            node.sync(req.epoch, &req.room_id, req.slot, &req.sessions)
        })
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .map_err(too_big)?;
        Ok(Response::new(registerpb::SyncResponse {
            result: Some(result),
            stored,
        }))
    }

    async fn digest(
        &self,
        req: Request<registerpb::DigestRequest>,
    ) -> Result<Response<registerpb::DigestResponse>, tonic::Status> {
        let req = req.into_inner();
        let node = self.node.clone();
        let mismatched =
            tokio::task::spawn_blocking(move || node.digest(req.epoch, &req.room_id, &req.slots))
                .await
                .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(Response::new(registerpb::DigestResponse { mismatched }))
    }

    async fn stats(
        &self,
        _req: Request<registerpb::StatsRequest>,
    ) -> Result<Response<registerpb::StatsResponse>, tonic::Status> {
        Ok(Response::new(self.node.stats()))
    }

    async fn slot_status(
        &self,
        req: Request<registerpb::SlotStatusRequest>,
    ) -> Result<Response<registerpb::SlotStatusResponse>, tonic::Status> {
        let req = req.into_inner();
        let node = self.node.clone();
        let (epoch, slots) = tokio::task::spawn_blocking(move || node.slot_status(&req.slots))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(Response::new(registerpb::SlotStatusResponse {
            epoch,
            slots,
        }))
    }
}

/// Serves `node` on `listener` until `shutdown` is cancelled (in-flight calls finish).
pub async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .initial_stream_window_size(longlink_common::GRPC_STREAM_WINDOW)
        .initial_connection_window_size(longlink_common::GRPC_CONNECTION_WINDOW)
        .add_service(
            RegisterServer::new(Service { node })
                .max_decoding_message_size(MAX_DECODE)
                .max_encoding_message_size(MAX_DECODE),
        )
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
        .map_err(|e| Error::Server(e.to_string()))
}
