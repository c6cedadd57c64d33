//! The HTTP routes (axum on tokio): `GET /health`, `GET /v1/models`,
//! `POST /v1/chat/completions`, `POST /v1/completions`; anything else is an OpenAI-shaped 404.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::mpsc::unbounded_channel;

use crate::errors::{ApiError, json_response};
use crate::model::ServedModel;
use crate::request::{self, Endpoint};
use crate::response::{Header, complete};
use crate::scheduler::{Event, Queue, Refused};
use crate::stream;

#[derive(Clone)]
pub struct AppState {
    pub model: Arc<ServedModel>,
    pub queue: Arc<Queue>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn health() -> Response {
    json_response(&json!({"status": "ok"}))
}

async fn models(State(state): State<AppState>) -> Response {
    json_response(&json!({
        "object": "list",
        "data": [{
            "id": state.model.id,
            "object": "model",
            "created": 0,
            "owned_by": "dagrun",
            "max_model_len": state.model.context,
        }],
    }))
}

async fn not_found(uri: Uri) -> Response {
    ApiError::not_found(uri.path()).into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::invalid(None, format!("{method} is not allowed on {}", uri.path()))
    }
    .into_response()
}

/// Largest request body read (a prompt past any context is refused long before this).
const MAX_BODY: usize = 16 << 20;

async fn chat(State(state): State<AppState>, body: Body) -> Response {
    generate(state, body, Endpoint::Chat).await
}

async fn completions(State(state): State<AppState>, body: Body) -> Response {
    generate(state, body, Endpoint::Completion).await
}

async fn generate(state: AppState, body: Body, endpoint: Endpoint) -> Response {
    // Read here rather than by an extractor, so that a body too large is an OpenAI-shaped 413.
    let Ok(body) = to_bytes(body, MAX_BODY).await else {
        return ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            ..ApiError::invalid(None, format!("the body is larger than {MAX_BODY} bytes"))
        }
        .into_response();
    };
    let request = match request::parse(&body, endpoint, &state.model) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let (events, mut received) = unbounded_channel();
    match state.queue.submit(request.clone(), events) {
        Ok(()) => {}
        Err(Refused::Full) => {
            return ApiError::unavailable("the request queue is full; retry later", "queue_full")
                .into_response();
        }
        Err(Refused::Closed) => {
            return ApiError::unavailable("the server is shutting down", "shutting_down")
                .into_response();
        }
        Err(Refused::TooLarge { most }) => {
            let asked = request.prompts.len() * request.n;
            return ApiError::invalid(
                Some("n"),
                format!(
                    "the request asks for {asked} choices (n × prompts); this server queues at most {most} (--max-queue)"
                ),
            )
            .into_response();
        }
    }
    if request.stream {
        return stream::respond(received, request, state.model.clone());
    }
    let mut completions = vec![None; request.prompts.len() * request.n];
    let mut open = completions.len();
    while open > 0 {
        match received.recv().await {
            Some(Event::Token { .. }) => {}
            Some(Event::Done { choice, completion }) => {
                if let Some(slot) = completions.get_mut(choice) {
                    *slot = Some(completion);
                    open -= 1;
                }
            }
            Some(Event::Failed { status, message }) => {
                return ApiError::from_status(status, message).into_response();
            }
            None => return ApiError::internal("the scheduler stopped").into_response(),
        }
    }
    let completions: Vec<_> = completions.into_iter().flatten().collect();
    let header = Header::new(endpoint, &state.model.id);
    json_response(&complete(
        &header,
        &request,
        &state.model.format.tokenizer,
        &completions,
    ))
}
