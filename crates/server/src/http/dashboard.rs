//! The web dashboard at `/`: four files compiled into the binary and served as written (no
//! build step, nothing fetched from elsewhere). The page itself only uses the public routes:
//! `/v1/events`, `/v1/summary`, history, output, `:stop`, `:restart`, `:pause`, `:resume` and
//! `DELETE /v1/agents/{id}`.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            // A new agentd binary may bring a new page: always ask.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            // `data:` images for the favicon, which is written into the page: nothing else
            // is fetched from anywhere but here.
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                ),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

pub(super) async fn page() -> Response {
    asset(
        "text/html; charset=utf-8",
        include_str!("dashboard/index.html"),
    )
}

pub(super) async fn script() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("dashboard/app.js"),
    )
}

pub(super) async fn events() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("dashboard/events.js"),
    )
}

pub(super) async fn style() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_str!("dashboard/style.css"),
    )
}
