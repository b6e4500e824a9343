//! Safe defaults for a server on a network: which ports may leave
//! loopback, and with what.

use std::net::SocketAddr;

/// The safe defaults: producers and readers beyond loopback need TLS and
/// `--auth` (so a plaintext `--listen` beyond loopback always needs
/// `--insecure`), a metrics port beyond loopback a token. `--insecure`
/// lets either be exposed anyway, with a warning (returned); without it
/// the first risk is the error.
pub fn exposure(
    listen: Option<SocketAddr>,
    tls_listen: Option<SocketAddr>,
    metrics: SocketAddr,
    auth: bool,
    metrics_token: bool,
    insecure: bool,
) -> Result<Vec<String>, String> {
    let mut risks = Vec::new();
    let without_auth = if auth { "" } else { " and without --auth" };
    if let Some(l) = listen.filter(|l| !l.ip().is_loopback()) {
        risks.push(format!(
            "producers and readers on {l} in plaintext (no TLS){without_auth}"
        ));
    }
    if let Some(l) = tls_listen.filter(|l| !l.ip().is_loopback() && !auth) {
        risks.push(format!("producers and readers on {l} without --auth"));
    }
    if !metrics.ip().is_loopback() && !metrics_token {
        risks.push(format!("/metrics on {metrics} without a token"));
    }
    match risks.first() {
        Some(first) if !insecure => Err(format!(
            "refusing to serve {first}: anyone on the network could use it; keep it on loopback, or give --insecure"
        )),
        _ => Ok(risks
            .into_iter()
            .map(|r| format!("warning: --insecure: serving {r}"))
            .collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_beyond_loopback_need_tls_and_auth_or_insecure() {
        let lo: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let lo6: SocketAddr = "[::1]:9464".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:7000".parse().unwrap();
        let any_tls: SocketAddr = "0.0.0.0:7443".parse().unwrap();
        let lan: SocketAddr = "10.1.2.3:9464".parse().unwrap();
        assert_eq!(
            exposure(Some(lo), None, lo6, false, false, false),
            Ok(vec![])
        );
        let e = exposure(Some(any), None, lo, true, false, false).unwrap_err();
        assert!(e.contains("0.0.0.0:7000 in plaintext (no TLS)") && e.contains("--insecure"));
        // TLS with auth may leave loopback; without auth it may not.
        assert_eq!(
            exposure(Some(lo), Some(any_tls), lo, true, false, false),
            Ok(vec![])
        );
        assert_eq!(
            exposure(None, Some(any_tls), lo, true, false, false),
            Ok(vec![])
        );
        let e = exposure(None, Some(any_tls), lo, false, false, false).unwrap_err();
        assert!(e.contains("0.0.0.0:7443 without --auth"), "{e}");
        // Plaintext beside TLS is still plaintext.
        let e = exposure(Some(any), Some(any_tls), lo, true, false, false).unwrap_err();
        assert!(e.contains("0.0.0.0:7000 in plaintext"), "{e}");
        let e = exposure(Some(lo), None, lan, true, false, false).unwrap_err();
        assert!(e.contains("/metrics on 10.1.2.3:9464"), "{e}");
        // A metrics token lets /metrics beyond loopback.
        assert_eq!(
            exposure(Some(lo), None, lan, false, true, false),
            Ok(vec![])
        );
        let w = exposure(Some(any), None, lan, false, false, true).unwrap();
        assert_eq!(w.len(), 2);
        assert!(w[0].contains("without --auth") && w[1].contains("/metrics"));
    }
}
