//! Tests of the endpoint's request parsing and answers.

use super::*;

#[test]
fn heads_end_at_the_first_blank_line() {
    assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
    assert_eq!(head_end(b"GET / HTTP/1.1\n\nrest"), Some(16));
    assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    assert_eq!(head_end(b""), None);
}

#[test]
fn requests_are_read_as_the_endpoint_answers_them() {
    let p = |s: &str| parse(s.as_bytes(), None);
    let get = |keep_alive| Request::Metrics {
        head: false,
        keep_alive,
    };
    assert_eq!(p("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), get(true));
    assert_eq!(p("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), get(false));
    assert_eq!(
        p("GET /metrics HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"),
        get(true)
    );
    assert_eq!(
        p("GET /metrics HTTP/1.1\r\nconnection: close\r\n\r\n"),
        get(false)
    );
    assert_eq!(
        p("HEAD /metrics HTTP/1.1\r\n\r\n"),
        Request::Metrics {
            head: true,
            keep_alive: true
        }
    );
    assert!(matches!(
        p("GET /other HTTP/1.1\r\n\r\n"),
        Request::NotFound { .. }
    ));
    assert_eq!(p("POST /metrics HTTP/1.1\r\n\r\n"), Request::Method);
    for bad in [
        "GET /metrics\r\n\r\n",
        "GET  /metrics HTTP/1.1\r\n\r\n",
        "GET metrics HTTP/1.1\r\n\r\n",
        "GET /metrics HTTP/2.0\r\n\r\n",
        "GET /metrics HTTP/1.1\r\nno colon\r\n\r\n",
        "GET /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
        "GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        "G(T /metrics HTTP/1.1\r\n\r\n",
        "\r\n\r\n",
    ] {
        assert_eq!(p(bad), Request::Bad, "{bad:?}");
    }
    assert_eq!(parse(b"GET /\xff HTTP/1.1\r\n\r\n", None), Request::Bad);
}

#[test]
fn answers_carry_length_type_and_connection() {
    let mut out = Vec::new();
    let req = Request::Metrics {
        head: true,
        keep_alive: true,
    };
    assert_eq!(answer(&req, &mut out, || "a 1\n".into()), (200, false));
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
    assert!(text.contains("Content-Type: text/plain; version=0.0.4"));
    assert!(text.contains("Content-Length: 4\r\n"));
    assert!(text.ends_with("Connection: keep-alive\r\n\r\n"), "{text}");
    let mut out = Vec::new();
    assert_eq!(answer(&Request::Method, &mut out, String::new), (405, true));
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("Allow: GET, HEAD\r\n"));
    assert!(text.ends_with("only GET and HEAD\n"));
}

#[test]
fn a_metrics_token_is_asked_for_and_checked() {
    let want = crate::auth::sha256(b"s3cret");
    let p = |s: &str| parse(s.as_bytes(), Some(&want));
    assert_eq!(p("GET /metrics HTTP/1.1\r\n\r\n"), Request::Unauthorized);
    assert_eq!(
        p("GET /metrics HTTP/1.1\r\nAuthorization: Bearer s3creT\r\n\r\n"),
        Request::Unauthorized
    );
    assert_eq!(
        p("GET /metrics HTTP/1.1\r\nAuthorization: Basic s3cret\r\n\r\n"),
        Request::Unauthorized
    );
    assert_eq!(
        p("HEAD /metrics HTTP/1.1\r\nauthorization: Bearer s3cret\r\n\r\n"),
        Request::Metrics {
            head: true,
            keep_alive: true
        }
    );
    let mut out = Vec::new();
    let (status, close) = answer(&Request::Unauthorized, &mut out, String::new);
    assert_eq!((status, close), (401, true));
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("WWW-Authenticate: Bearer"), "{text}");
}
