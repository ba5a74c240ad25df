//! Opening a cloud object store from its URL: the one place checkpoints (gradflow-checkpoint)
//! and training data (gradflow-data) build an S3, GCS, Azure or HTTP store, so both take their
//! credentials the same way.
//!
//! A store is configured by the environment first (`AWS_ACCESS_KEY_ID`, `AWS_REGION`,
//! `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, ...; `GOOGLE_SERVICE_ACCOUNT`, ...;
//! `AZURE_STORAGE_ACCOUNT_NAME`, ...), then by explicit object_store keys (`aws_endpoint`,
//! `google_service_account`, ...). Building does no I/O: a wrong bucket or credentials show up
//! at the first request. Only built with this crate's `object-store` feature.

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::http::HttpBuilder;
use object_store::{ClientConfigKey, ObjectStoreScheme};
use thiserror::Error;
use url::Url;

/// Why [`cloud_store`] could not build a store.
#[derive(Debug, Error)]
pub enum StoreUrlError {
    /// The URL does not parse, or names no cloud store (`ftp://`, a local path, ...).
    #[error("`{url}`: {reason}")]
    Invalid {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An explicit option is not a key the store knows.
    #[error("`{url}`: unknown storage option `{key}`")]
    UnknownOption {
        /// The URL as given.
        url: String,
        /// The key.
        key: String,
    },
    /// The store's builder refused its configuration (a bad bucket name, say).
    #[error("cannot open the object store for `{url}`: {cause}")]
    Build {
        /// The URL as given.
        url: String,
        /// What object_store said.
        cause: object_store::Error,
    },
}

/// The store for `url` (`s3://` and `s3a://`, `gs://`, `az://`, `azure://`, `abfs(s)://`,
/// `http(s)://`), configured by the environment and then by `options` (object_store keys);
/// paths inside it are relative to its bucket (or, for HTTP, its host).
pub fn cloud_store(url: &str, options: &[(String, String)]) -> Result<Arc<dyn ObjectStore>, StoreUrlError> {
    let invalid = |reason: String| StoreUrlError::Invalid { url: url.to_string(), reason };
    let parsed = Url::parse(url).map_err(|e| invalid(e.to_string()))?;
    let (scheme, _) = ObjectStoreScheme::parse(&parsed).map_err(|e| invalid(e.to_string()))?;
    let bad_key = |k: &str| StoreUrlError::UnknownOption { url: url.to_string(), key: k.to_string() };
    let build = |cause| StoreUrlError::Build { url: url.to_string(), cause };
    Ok(match scheme {
        ObjectStoreScheme::AmazonS3 => {
            let mut b = AmazonS3Builder::from_env().with_url(url);
            for (k, v) in options {
                b = b.with_config(k.parse().map_err(|_| bad_key(k))?, v);
            }
            Arc::new(b.build().map_err(build)?)
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            let mut b = GoogleCloudStorageBuilder::from_env().with_url(url);
            for (k, v) in options {
                b = b.with_config(k.parse().map_err(|_| bad_key(k))?, v);
            }
            Arc::new(b.build().map_err(build)?)
        }
        ObjectStoreScheme::MicrosoftAzure => {
            let mut b = MicrosoftAzureBuilder::from_env().with_url(url);
            for (k, v) in options {
                b = b.with_config(k.parse().map_err(|_| bad_key(k))?, v);
            }
            Arc::new(b.build().map_err(build)?)
        }
        ObjectStoreScheme::Http => {
            let mut b = HttpBuilder::new().with_url(&parsed[..url::Position::BeforePath]);
            for (k, v) in options {
                b = b.with_config(k.parse::<ClientConfigKey>().map_err(|_| bad_key(k))?, v);
            }
            Arc::new(b.build().map_err(build)?)
        }
        other => return Err(invalid(format!("{other:?} is not a cloud store"))),
    })
}
