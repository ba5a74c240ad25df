//! `gradflow serve` on Kubernetes: a Deployment of model servers and a Service in front of
//! them, rendered without a cluster (`gradflow serve URL --dry-run -o yaml`).
//!
//! Each replica runs `gradflow serve URL --listen 0.0.0.0:8501`, reads the checkpoint from the
//! object store (credentials from the Secrets named with `--env-from-secret`, as `AWS_*`,
//! `GOOGLE_*` or `AZURE_*` variables) and follows its `latest`. A replica binds its port only
//! once its model is loaded, so the TCP readiness probe admits it to the Service then.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvFromSource, PodSpec, PodTemplateSpec, Probe, SecretEnvSource, Service,
    ServicePort, ServiceSpec, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::config::DEFAULT_IMAGE;
use super::{KubernetesError, LABEL_PREFIX};

/// The label that selects a model server's pods: its name.
pub const LABEL_SERVE: &str = "gradflow.dev/serve";
/// The port a model server listens on in its pod (TensorFlow Serving's REST port).
pub const SERVE_PORT: i32 = 8501;

/// One model server deployment: what `gradflow serve --dry-run` renders.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeDeployment {
    /// Name of the Deployment and the Service.
    pub name: String,
    pub namespace: String,
    /// The checkpoint root (or one checkpoint) on an object store.
    pub url: String,
    /// `latest` (followed), a step, or a directory name.
    pub step: String,
    /// How often `latest` is looked at, as `gradflow serve --poll` takes it.
    pub poll: String,
    pub image: String,
    pub replicas: i32,
    /// Secrets whose keys become the containers' variables (object store credentials).
    pub env_from_secrets: Vec<String>,
}

impl ServeDeployment {
    /// Defaults: namespace `default`, `latest` polled every 10 s, image [`DEFAULT_IMAGE`], 2
    /// replicas, no Secrets.
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> ServeDeployment {
        ServeDeployment {
            name: name.into(),
            namespace: "default".into(),
            url: url.into(),
            step: "latest".into(),
            poll: "10s".into(),
            image: DEFAULT_IMAGE.into(),
            replicas: 2,
            env_from_secrets: Vec::new(),
        }
    }

    /// Checks the name and that the checkpoint is where every pod can read it: an object
    /// store URL (`s3://`, `gs://`, `az://`, `http(s)://`), not a path in one container.
    pub fn check(&self) -> Result<(), KubernetesError> {
        super::config::check_name(&self.name).map_err(|e| KubernetesError::Config(e.to_string()))?;
        let url = self.url.trim();
        let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        let shared = matches!(
            scheme.as_deref(),
            Some("s3" | "s3a" | "gs" | "az" | "azure" | "abfs" | "abfss" | "http" | "https")
        );
        if !shared {
            return Err(KubernetesError::Config(format!(
                "gradflow serve on Kubernetes reads the checkpoint from an object store, but `{url}` is not an \
                 object store URL (s3://, gs://, az://): every replica, on any node, must find it"
            )));
        }
        if self.replicas < 1 {
            return Err(KubernetesError::Config(format!(
                "replicas is {}, expected at least 1",
                self.replicas
            )));
        }
        Ok(())
    }

    fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_SERVE.to_string(), self.name.clone()),
            (format!("{LABEL_PREFIX}component"), "serve".to_string()),
        ])
    }

    fn meta(&self) -> ObjectMeta {
        ObjectMeta {
            name: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels()),
            ..ObjectMeta::default()
        }
    }

    /// The Deployment and the Service.
    pub fn manifests(&self) -> Result<(Deployment, Service), KubernetesError> {
        self.check()?;
        let selector = BTreeMap::from([(LABEL_SERVE.to_string(), self.name.clone())]);
        let container = Container {
            name: "serve".into(),
            image: Some(self.image.clone()),
            command: Some(vec!["gradflow".into()]),
            args: Some(vec![
                "serve".into(),
                self.url.clone(),
                "--listen".into(),
                format!("0.0.0.0:{SERVE_PORT}"),
                "--step".into(),
                self.step.clone(),
                "--poll".into(),
                self.poll.clone(),
            ]),
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: SERVE_PORT,
                ..ContainerPort::default()
            }]),
            env_from: (!self.env_from_secrets.is_empty()).then(|| {
                self.env_from_secrets
                    .iter()
                    .map(|s| EnvFromSource {
                        secret_ref: Some(SecretEnvSource { name: s.clone(), optional: None }),
                        ..EnvFromSource::default()
                    })
                    .collect()
            }),
            readiness_probe: Some(Probe {
                tcp_socket: Some(TCPSocketAction { port: IntOrString::Int(SERVE_PORT), host: None }),
                period_seconds: Some(5),
                ..Probe::default()
            }),
            ..Container::default()
        };
        let deployment = Deployment {
            metadata: self.meta(),
            spec: Some(DeploymentSpec {
                replicas: Some(self.replicas),
                selector: LabelSelector { match_labels: Some(selector.clone()), ..LabelSelector::default() },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta { labels: Some(self.labels()), ..ObjectMeta::default() }),
                    spec: Some(PodSpec { containers: vec![container], ..PodSpec::default() }),
                },
                ..DeploymentSpec::default()
            }),
            ..Deployment::default()
        };
        let service = Service {
            metadata: self.meta(),
            spec: Some(ServiceSpec {
                selector: Some(selector),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: SERVE_PORT,
                    target_port: Some(IntOrString::String("http".into())),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        };
        Ok((deployment, service))
    }

    /// The Deployment and the Service as a multi-document YAML stream (`kubectl apply -f`).
    pub fn to_yaml(&self) -> Result<String, KubernetesError> {
        let (deployment, service) = self.manifests()?;
        let ser = |e: serde_yaml_ng::Error| KubernetesError::Serialize(e.to_string());
        Ok(format!(
            "---\n{}---\n{}",
            serde_yaml_ng::to_string(&deployment).map_err(ser)?,
            serde_yaml_ng::to_string(&service).map_err(ser)?
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_deployment_and_a_service_that_select_its_pods() {
        let mut d = ServeDeployment::new("ctr", "s3://bucket/jobs/ctr");
        d.env_from_secrets = vec!["s3".into()];
        let (deployment, service) = d.manifests().unwrap();
        let spec = deployment.spec.unwrap();
        let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
        for (k, v) in service.spec.as_ref().unwrap().selector.as_ref().unwrap() {
            assert_eq!(pod_labels.get(k), Some(v));
        }
        let c = &spec.template.spec.unwrap().containers[0];
        assert_eq!(
            c.args.as_ref().unwrap()[..4],
            ["serve", "s3://bucket/jobs/ctr", "--listen", "0.0.0.0:8501"]
        );
        assert_eq!(c.env_from.as_ref().unwrap()[0].secret_ref.as_ref().unwrap().name, "s3");
        let yaml = d.to_yaml().unwrap();
        assert!(yaml.contains("kind: Deployment") && yaml.contains("kind: Service"), "{yaml}");
    }

    #[test]
    fn refuses_a_checkpoint_that_only_one_container_could_read() {
        for url in ["./checkpoints", "/data/ckpt", "file:///data", "memory://x"] {
            let e = ServeDeployment::new("ctr", url).manifests().unwrap_err().to_string();
            assert!(e.contains("object store"), "{e}");
        }
    }
}
