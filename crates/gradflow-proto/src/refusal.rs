//! What a refusal carries beside its gRPC code: the gradflow facts a client acts on.
//!
//! A server refuses a request with a `tonic::Status`. Its code says what kind of failure it
//! is; some refusals also carry a fact in the status metadata that tells a client what to do
//! next (resynchronise to a version, ask for a new data task, stop retrying). Those keys and
//! their values are defined here, once: the server sets them in its error mapping (gradflow-ps
//! `error.rs`) and clients read them with the functions below, never by matching on the
//! human-readable message. The tensor link carries a status's metadata unchanged
//! ([`crate::link::reply_of`]), so these work over both transports.

use std::fmt;
use std::str::FromStr;

use tonic::Status;

/// Metadata key carrying the shard's model version on a stale-step, rewind or
/// checkpoint-passed refusal: a worker that fell behind resynchronises without another round
/// trip.
pub const VERSION_METADATA: &str = "x-gradflow-version";

/// Metadata key carrying the lost lease on a refusal because a data task went to another
/// worker.
pub const LEASE_LOST_METADATA: &str = "x-gradflow-lease-lost";

/// Metadata key carrying the step whose update would have made the model non-finite: the
/// shard refuses everything from then on, so a worker must not retry.
pub const NON_FINITE_METADATA: &str = "x-gradflow-non-finite-step";

/// Metadata key carrying a [`RefusalCode`]: why the server refused, where the gRPC code alone
/// does not say enough for a client to decide.
pub const CODE_METADATA: &str = "x-gradflow-code";

/// A gradflow-specific reason for a refusal, carried as [`CODE_METADATA`].
///
/// Unknown values (from a newer server) decode as `None`, so a client treats them as a
/// refusal with no code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalCode {
    /// The server is stopping: its `UNAVAILABLE` will not go away by retrying.
    ShuttingDown,
    /// Training ended early (early stopping) at the model version the refusal's
    /// [`VERSION_METADATA`] gives: a worker's training is over, which is no failure.
    Finished,
}

impl RefusalCode {
    /// The value on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::ShuttingDown => "shutting-down",
            RefusalCode::Finished => "finished",
        }
    }
}

impl fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A [`CODE_METADATA`] value this build does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown refusal code `{0}`")]
pub struct UnknownRefusalCode(pub String);

impl FromStr for RefusalCode {
    type Err = UnknownRefusalCode;

    fn from_str(s: &str) -> Result<RefusalCode, UnknownRefusalCode> {
        match s {
            "shutting-down" => Ok(RefusalCode::ShuttingDown),
            "finished" => Ok(RefusalCode::Finished),
            other => Err(UnknownRefusalCode(other.to_string())),
        }
    }
}

/// Marks `status` with `code`.
pub fn set_code(status: &mut Status, code: RefusalCode) {
    status.metadata_mut().insert(CODE_METADATA, tonic::metadata::MetadataValue::from_static(code.as_str()));
}

/// The refusal code `status` carries, if any (and if this build knows it).
pub fn code(status: &Status) -> Option<RefusalCode> {
    status.metadata().get(CODE_METADATA)?.to_str().ok()?.parse().ok()
}

/// Sets the number under `key` (one of this module's keys).
pub fn set_u64(status: &mut Status, key: &'static str, value: u64) {
    status.metadata_mut().insert(key, value.into());
}

/// The number under `key` (one of this module's keys), if `status` carries a valid one.
pub fn get_u64(status: &Status, key: &str) -> Option<u64> {
    status.metadata().get(key)?.to_str().ok()?.parse().ok()
}

/// The model version a stale-step, rewind or checkpoint-passed refusal carries.
pub fn version(status: &Status) -> Option<u64> {
    get_u64(status, VERSION_METADATA)
}

/// The lease a lost-lease refusal carries.
pub fn lease_lost(status: &Status) -> Option<u64> {
    get_u64(status, LEASE_LOST_METADATA)
}

/// The step whose update made the model non-finite, on every refusal from a shard that
/// stopped training.
pub fn non_finite_step(status: &Status) -> Option<u64> {
    get_u64(status, NON_FINITE_METADATA)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_numbers_round_trip_and_survive_the_link() {
        let mut s = Status::unavailable("server is shutting down");
        set_code(&mut s, RefusalCode::ShuttingDown);
        set_u64(&mut s, VERSION_METADATA, 7);
        assert_eq!(code(&s), Some(RefusalCode::ShuttingDown));
        assert_eq!(version(&s), Some(7));
        assert_eq!(lease_lost(&s), None);
        let back = crate::link::status_of(&crate::link::reply_of(&s)).unwrap();
        assert_eq!(code(&back), Some(RefusalCode::ShuttingDown));
        assert_eq!(version(&back), Some(7));
    }

    #[test]
    fn unknown_or_missing_codes_are_none() {
        let mut s = Status::unavailable("server is shutting down");
        assert_eq!(code(&s), None, "the message alone is not a code");
        s.metadata_mut().insert(CODE_METADATA, "from-the-future".parse().unwrap());
        assert_eq!(code(&s), None);
        assert!("from-the-future".parse::<RefusalCode>().is_err());
        assert_eq!(RefusalCode::ShuttingDown.to_string().parse(), Ok(RefusalCode::ShuttingDown));
    }
}
