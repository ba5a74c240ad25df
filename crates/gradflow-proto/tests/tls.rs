//! Checking a `[tls]` section's files: certificates made in the test load; a missing file, a
//! file that holds something else, or a key that is not the certificate's is an error that
//! names the key and the file.

use std::path::Path;

use gradflow_proto::tls::test_certs::{TestCa, loopback_config};
use gradflow_proto::tls::{ClientTls, TlsConfig, TlsError, url};

fn err(config: &TlsConfig) -> TlsError {
    config.validate().expect_err("the settings are refused")
}

fn assert_names(e: &TlsError, key: &str, path: &Path, expected: &str) {
    let text = e.to_string();
    assert_eq!(e.key(), key, "{text}");
    assert!(text.starts_with(key), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains(expected), "expected `{expected}` in: {text}");
}

#[test]
fn certificates_made_here_load_for_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    for mutual in [false, true] {
        let config = loopback_config(dir.path(), mutual);
        config.validate().unwrap();
        assert_eq!(config.server().mutual(), mutual);
        assert_eq!(config.client().identity.is_some(), mutual);
        config.client().with_domain("localhost").load().unwrap();
    }
}

#[test]
fn a_missing_file_is_named_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = loopback_config(dir.path(), true);
    let gone = dir.path().join("gone.pem");
    for (key, config) in [
        ("tls.cert", TlsConfig { cert: gone.clone(), ..good.clone() }),
        ("tls.key", TlsConfig { key: gone.clone(), ..good.clone() }),
        ("tls.ca", TlsConfig { ca: gone.clone(), ..good.clone() }),
        ("tls.client_ca", TlsConfig { client_ca: Some(gone.clone()), ..good.clone() }),
        ("tls.client_cert", TlsConfig { client_cert: Some(gone.clone()), ..good.clone() }),
        ("tls.client_key", TlsConfig { client_key: Some(gone.clone()), ..good.clone() }),
    ] {
        assert_names(&err(&config), key, &gone, "cannot read");
    }
}

#[test]
fn a_file_with_the_wrong_contents_says_what_was_expected() {
    let dir = tempfile::tempdir().unwrap();
    let good = loopback_config(dir.path(), true);
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "hello\n").unwrap();
    assert_names(
        &err(&TlsConfig { cert: junk.clone(), ..good.clone() }),
        "tls.cert",
        &junk,
        "BEGIN CERTIFICATE",
    );
    assert_names(&err(&TlsConfig { ca: junk.clone(), ..good.clone() }), "tls.ca", &junk, "BEGIN CERTIFICATE");
    assert_names(&err(&TlsConfig { key: junk.clone(), ..good.clone() }), "tls.key", &junk, "private key");
    // A key where a certificate belongs, and a certificate where a key belongs.
    let e = err(&TlsConfig { cert: good.key.clone(), ..good.clone() });
    assert_names(&e, "tls.cert", &good.key, "BEGIN CERTIFICATE");
    let e = err(&TlsConfig { client_key: good.client_cert.clone(), ..good.clone() });
    assert_names(&e, "tls.client_key", good.client_cert.as_ref().unwrap(), "private key");
    // A certificate block that is not a certificate.
    let broken = dir.path().join("broken.pem");
    std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
    assert_names(
        &err(&TlsConfig { ca: broken.clone(), ..good.clone() }),
        "tls.ca",
        &broken,
        "does not parse",
    );
}

#[test]
fn a_key_that_is_not_the_certificates_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = loopback_config(dir.path(), true);
    let swapped = TlsConfig { key: good.client_key.clone().unwrap(), ..good.clone() };
    assert_names(
        &err(&swapped),
        "tls.key",
        good.client_key.as_ref().unwrap(),
        "is not the key of the certificate",
    );
    let swapped = TlsConfig { client_key: Some(good.key.clone()), ..good.clone() };
    assert_names(&err(&swapped), "tls.client_key", &good.key, "is not the key of the certificate");
}

#[test]
fn keys_that_need_each_other_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let good = loopback_config(dir.path(), true);
    let e = TlsConfig { client_key: None, ..good.clone() }.check_keys().unwrap_err();
    assert_eq!(e.key(), "tls.client_key", "{e}");
    let e = TlsConfig { client_cert: None, client_key: None, ..good.clone() }.check_keys().unwrap_err();
    assert_eq!(e.key(), "tls.client_cert", "{e}");
    assert!(e.to_string().contains("tls.client_ca"), "{e}");
    let e = TlsConfig { domain: Some("no spaces allowed".into()), ..good.clone() }.check_keys().unwrap_err();
    assert_eq!(e.key(), "tls.domain", "{e}");
    // Without mutual TLS a client certificate is optional.
    TlsConfig { client_ca: None, client_cert: None, client_key: None, ..good }.validate().unwrap();
}

#[test]
fn a_client_built_in_code_names_its_own_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let client = ca.client(dir.path(), "worker");
    ClientTls::new(&ca.cert).with_identity(&client.cert, &client.key).load().unwrap();
    let e = ClientTls::new(dir.path().join("nope.pem")).load().unwrap_err();
    assert_eq!(e.key(), "tls.ca", "{e}");
    let e = ClientTls::new(&ca.cert).with_identity(&client.cert, &ca.cert).load().unwrap_err();
    assert_eq!(e.key(), "tls.client_key", "{e}");
}

#[test]
fn addresses_get_the_scheme_of_the_transport() {
    assert_eq!(url("10.0.0.1:7000", false).unwrap(), "http://10.0.0.1:7000");
    assert_eq!(url("10.0.0.1:7000", true).unwrap(), "https://10.0.0.1:7000");
    assert_eq!(url("https://ps-0:7000", true).unwrap(), "https://ps-0:7000");
    assert!(url("http://ps-0:7000", true).unwrap_err().to_string().contains("TLS is configured"));
    assert!(url("https://ps-0:7000", false).unwrap_err().to_string().contains("no TLS"));
}
