//! The gRPC adapter: the `Predictor` service of `proto/gradflow.proto` over a [`Server`].
//!
//! A request's instances become the same rows the REST adapter decodes (a `number` is a JSON
//! number, `text` a string, `integer` an integer, `null` a null), so both transports answer
//! alike. Errors map to gRPC codes in one place, `From<ServeError> for Status`.

use std::sync::Arc;
use std::time::Instant;

use gradflow_proto::pb;
use gradflow_proto::pb::predictor_server::{Predictor, PredictorServer};
use serde_json::{Map, Value};
use tonic::{Request, Response, Status};

use crate::{ServeError, Server};

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Status {
        match e {
            ServeError::Input(_) => Status::invalid_argument(e.to_string()),
            ServeError::Stopped => Status::unavailable(e.to_string()),
            _ => Status::internal(e.to_string()),
        }
    }
}

/// The `Predictor` service over a [`Server`].
pub struct PredictService {
    server: Arc<Server>,
}

/// One instance as the row the decoder takes; a feature without a value is refused naming
/// its column.
fn row(index: usize, instance: pb::Instance) -> Result<Map<String, Value>, Status> {
    use pb::feature::Kind;
    let mut out = Map::new();
    for (name, feature) in instance.columns {
        let value = match feature.kind {
            Some(Kind::Number(x)) => serde_json::Number::from_f64(x).map(Value::Number).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "instance {index}: column `{name}` must be a finite number, got {x}"
                ))
            })?,
            Some(Kind::Text(s)) => Value::String(s),
            Some(Kind::Integer(i)) => Value::from(i),
            Some(Kind::Null(_)) => Value::Null,
            None => {
                return Err(Status::invalid_argument(format!(
                    "instance {index}: column `{name}` has no value"
                )));
            }
        };
        out.insert(name, value);
    }
    Ok(out)
}

#[tonic::async_trait]
impl Predictor for PredictService {
    async fn predict(
        &self,
        request: Request<pb::PredictRequest>,
    ) -> Result<Response<pb::PredictResponse>, Status> {
        let started = Instant::now();
        let result = self.answer(request.into_inner()).await;
        let code = match &result {
            Ok(_) => 200,
            Err(s) if s.code() == tonic::Code::InvalidArgument => 400,
            Err(s) if s.code() == tonic::Code::NotFound => 404,
            Err(_) => 500,
        };
        self.server.metrics().observe("grpc", code, started.elapsed().as_secs_f64());
        result
    }
}

impl PredictService {
    async fn answer(&self, req: pb::PredictRequest) -> Result<Response<pb::PredictResponse>, Status> {
        let current = self.server.current();
        let job = &current.model.info().job;
        if req.model != *job {
            return Err(Status::not_found(format!("no model `{}`: this server serves `{job}`", req.model)));
        }
        let rows = req
            .instances
            .into_iter()
            .enumerate()
            .map(|(i, inst)| row(i, inst))
            .collect::<Result<Vec<_>, _>>()?;
        drop(current);
        let (predictions, step) = self.server.predict_with_step(&rows).await?;
        Ok(Response::new(pb::PredictResponse { predictions, step }))
    }
}

/// The service, for a tonic router.
pub fn service(server: Arc<Server>) -> PredictorServer<PredictService> {
    PredictorServer::new(PredictService { server })
}

/// Serves the `Predictor` service on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: Arc<Server>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(service(server))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
