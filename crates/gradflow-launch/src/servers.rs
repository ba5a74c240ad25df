//! The settings each server process of a job starts with: gradflow-ps's [`ServerConfig`] for
//! one shard, built from the job. Both backends start `gradflow ps`, which calls
//! [`server_config`] on the job it is given.

use gradflow_job::JobConfig;
use gradflow_proto::tls::TlsConfig;
use gradflow_ps::ServerConfig;

/// The settings of server shard `shard` of `job`: the job's `[server]` section (through
/// [`ServerConfig::from_settings`]), its size and mode, transport, checkpoints, `restore`, and
/// both sides of its `[tls]` section (the server's, and the client's for shard 0's calls to
/// the other shards). The token is not in it: a server takes it from `GRADFLOW_TOKEN`.
pub fn server_config(job: &JobConfig, shard: u32) -> ServerConfig {
    ServerConfig {
        shard,
        num_shards: job.servers,
        num_workers: job.workers,
        mode: job.mode,
        max_staleness: job.max_staleness,
        transport: job.transport.clone(),
        checkpoint: job.checkpoint.clone(),
        restore: job.restore.clone(),
        embedding: job.embedding.clone(),
        tls: job.tls.as_ref().map(TlsConfig::server),
        peer_tls: job.client_tls(),
        ..ServerConfig::from_settings(&job.server)
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use super::*;

    const MIN: &str = "name = \"demo\"\n[model]\nkind = \"logistic_regression\"\n[data]\ntrain = \"t.libsvm\"\nformat = \"libsvm\"\n";

    #[test]
    fn a_shard_gets_the_job_settings() {
        // The job is checked as its servers will check it.
        let err = JobConfig::parse(&format!("{MIN}[server]\nbackup_workers = 1\n")).unwrap_err().to_string();
        assert!(err.contains("backup_workers is 1 but the job has 1 workers"), "{err}");

        let job = JobConfig::parse(&format!(
            "workers = 3\nservers = 2\nrestore = \"40\"\n{MIN}[server]\nheartbeat_timeout = \"2s\"\n\
             backup_workers = 1\nmax_memory = 0\nlink_port = 7071\n[checkpoint]\nurl = \"memory://ck\"\n"
        ))
        .unwrap();
        let c = server_config(&job, 1);
        c.validate().unwrap();
        assert_eq!((c.shard, c.num_shards, c.num_workers), (1, 2, 3));
        assert_eq!(c.settings.heartbeat_timeout, Duration::from_secs(2));
        assert_eq!(
            (c.settings.backup_workers, c.settings.max_memory, c.settings.link_port),
            (1, Some(0), 7071)
        );
        assert_eq!(c.restore, Some(gradflow_core::Restore::Step(40)));
        assert_eq!(c.checkpoint.as_ref().unwrap().url, "memory://ck");
        assert!(c.tls.is_none() && c.peer_tls.is_none() && c.token.is_none());
        // What the job does not set is the server's default.
        let d = ServerConfig::default();
        assert_eq!(
            (c.settings.startup_timeout, c.settings.wait_timeout, c.inline_bytes),
            (d.settings.startup_timeout, d.settings.wait_timeout, d.inline_bytes)
        );
    }

    #[test]
    fn a_shard_gets_both_sides_of_the_job_tls() {
        let mut job = JobConfig::parse(&format!(
            "{MIN}[tls]\ncert = \"certs/server.pem\"\nkey = \"certs/server.key\"\nca = \"certs/ca.pem\"\n"
        ))
        .unwrap();
        job.resolve_paths(Path::new("/jobs"));
        let c = server_config(&job, 0);
        assert_eq!(c.tls.unwrap().cert, PathBuf::from("/jobs/certs/server.pem"));
        assert_eq!(c.peer_tls.unwrap().ca, PathBuf::from("/jobs/certs/ca.pem"));
    }
}
