//! The dashboard `serve --http` answers `GET /` with: a chat box streaming through
//! `/v1/chat/completions` and live panels polling `/v1/stats` (see `stats`). The page, its
//! style and its script are files under `dashboard/`, built into the binary: no CDN, no build
//! step, nothing fetched from elsewhere (the Content-Security-Policy says so to the browser).

/// One file of the page.
pub struct Asset {
    pub content_type: &'static str,
    pub body: &'static str,
}

/// Only this server's own files, scripts and connections; inline scripts and styles refused.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

pub fn asset(path: &str) -> Option<Asset> {
    let (content_type, body) = match path {
        "/" | "/index.html" => (
            "text/html; charset=utf-8",
            include_str!("dashboard/index.html"),
        ),
        "/dashboard.css" => (
            "text/css; charset=utf-8",
            include_str!("dashboard/dashboard.css"),
        ),
        "/dashboard.js" => (
            "text/javascript; charset=utf-8",
            include_str!("dashboard/dashboard.js"),
        ),
        _ => return None,
    };
    Some(Asset { content_type, body })
}

pub fn is_asset(path: &str) -> bool {
    asset(path).is_some()
}
