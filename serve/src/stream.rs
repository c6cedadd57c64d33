//! `stream: true`: server-sent events in OpenAI's chunk format. A chat stream opens each
//! choice with `{"role": "assistant"}`; text arrives as the tokens are made (held back only
//! where it may still change, see `text.rs`); each choice ends with a chunk carrying its
//! `finish_reason`; the last of those carries `usage` (or, with `stream_options:
//! {include_usage: true}`, a last chunk with no choices does, as OpenAI sends it); then
//! `data: [DONE]`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event as Sse, Sse as SseResponse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::errors::ApiError;
use crate::model::ServedModel;
use crate::request::{Endpoint, GenerationRequest};
use crate::response::{
    Header, chat_logprobs, completion_logprobs, finish_reason, token_text, usage,
};
use crate::scheduler::Event;
use crate::text::{ChoiceText, ReasoningSplit};

struct Streamer {
    events: UnboundedReceiver<Event>,
    request: GenerationRequest,
    model: Arc<ServedModel>,
    header: Header,
    texts: Vec<ChoiceText>,
    splits: Vec<ReasoningSplit>,
    /// Token log-probs not sent yet, per choice.
    logprobs: Vec<Vec<(String, f32)>>,
    open: usize,
    generated: usize,
    /// SSE `data:` payloads ready to send.
    out: VecDeque<String>,
    ended: bool,
}

pub fn respond(
    events: UnboundedReceiver<Event>,
    request: GenerationRequest,
    model: Arc<ServedModel>,
) -> Response {
    let choices = request.prompts.len() * request.n;
    let prefix = match request.endpoint {
        Endpoint::Chat => request.reply_prefix.clone(),
        Endpoint::Completion => String::new(),
    };
    let mut streamer = Streamer {
        events,
        header: Header::new(request.endpoint, &model.id),
        texts: (0..choices)
            .map(|_| ChoiceText::new(&prefix, &request.params.stop_strings))
            .collect(),
        splits: (0..choices).map(|_| ReasoningSplit::default()).collect(),
        logprobs: vec![Vec::new(); choices],
        open: choices,
        generated: 0,
        out: VecDeque::new(),
        ended: false,
        request,
        model,
    };
    if streamer.request.endpoint == Endpoint::Chat {
        for index in 0..choices {
            let delta = json!({"role": "assistant", "content": ""});
            streamer.push_chunk(index, delta, None, None);
        }
    }
    let body = stream::unfold(streamer, |mut s| async move {
        loop {
            if let Some(data) = s.out.pop_front() {
                return Some((Ok::<_, Infallible>(Sse::default().data(data)), s));
            }
            if s.ended {
                return None;
            }
            match s.events.recv().await {
                Some(event) => s.handle(event),
                None => s.fail(ApiError::internal("the scheduler stopped")),
            }
        }
    });
    SseResponse::new(body).into_response()
}

impl Streamer {
    fn handle(&mut self, event: Event) {
        match event {
            Event::Token {
                choice,
                token,
                logprob,
            } => {
                let Some(text) = self.texts.get_mut(choice) else {
                    return;
                };
                self.generated += 1;
                let delta = text.push(&self.model.format.tokenizer, token);
                if self.request.logprobs && !self.request.stop_ids.contains(&token) {
                    let shown = token_text(&self.model.format.tokenizer, token);
                    self.logprobs[choice].push((shown, logprob));
                }
                if !delta.is_empty() {
                    self.push_text(choice, &delta, None);
                }
            }
            Event::Done { choice, completion } => {
                let Some(text) = self.texts.get_mut(choice) else {
                    return;
                };
                let full = match self.request.endpoint {
                    Endpoint::Chat => format!("{}{}", self.request.reply_prefix, completion.text),
                    Endpoint::Completion => completion.text.clone(),
                };
                let rest = text.finish(&full);
                self.push_text(
                    choice,
                    &rest,
                    Some(finish_reason(&completion.finish_reason)),
                );
                self.open -= 1;
                if self.open == 0 {
                    let totals = usage(&self.request, self.generated);
                    if self.request.include_usage {
                        let mut last = self.header.body(self.request.endpoint, true, Vec::new());
                        last["usage"] = totals;
                        self.out.push_back(last.to_string());
                    } else if let Some(finishing) = self.out.pop_back() {
                        // Clients read `choices[0]` of every chunk: no empty-choices chunk
                        // unless asked for; the usage goes on the finishing one.
                        let mut chunk: Value =
                            serde_json::from_str(&finishing).unwrap_or_else(|_| json!({}));
                        chunk["usage"] = totals;
                        self.out.push_back(chunk.to_string());
                    }
                    self.out.push_back("[DONE]".into());
                    self.ended = true;
                }
            }
            Event::Failed { status, message } => {
                let error = ApiError::from_status(status, message);
                self.fail(error);
            }
        }
    }

    /// Sends `delta` of choice `index` (split into reasoning and answer when asked), with the
    /// log-probs gathered since the last chunk; `finish` closes the choice.
    fn push_text(&mut self, index: usize, delta: &str, finish: Option<&str>) {
        let body = match self.request.endpoint {
            Endpoint::Completion => json!({ "text": delta }),
            Endpoint::Chat if self.request.reasoning => {
                let split = &mut self.splits[index];
                let (mut reasoning, mut answer) = split.push(delta);
                if finish.is_some() {
                    let (r, a) = split.finish();
                    reasoning.push_str(&r);
                    answer.push_str(&a);
                }
                let mut d = json!({});
                if !reasoning.is_empty() {
                    d["reasoning_content"] = reasoning.into();
                }
                if !answer.is_empty() {
                    d["content"] = answer.into();
                }
                d
            }
            Endpoint::Chat => json!({ "content": delta }),
        };
        let empty = body.as_object().is_none_or(|o| o.is_empty())
            || body.get("text").is_some_and(|t| t == "");
        let logprobs = std::mem::take(&mut self.logprobs[index]);
        if empty && finish.is_none() {
            self.logprobs[index] = logprobs; // nothing to say yet: keep them for the next chunk
            return;
        }
        let logprobs = self.request.logprobs.then_some(logprobs);
        self.push_chunk(index, body, logprobs, finish);
    }

    fn push_chunk(
        &mut self,
        index: usize,
        delta: Value,
        logprobs: Option<Vec<(String, f32)>>,
        finish: Option<&str>,
    ) {
        let mut choice = match self.request.endpoint {
            Endpoint::Chat => json!({
                "index": index,
                "delta": delta,
                "logprobs": logprobs.as_deref().map(chat_logprobs),
            }),
            Endpoint::Completion => json!({
                "index": index,
                "text": delta.get("text").cloned().unwrap_or_else(|| "".into()),
                "logprobs": logprobs.as_deref().map(completion_logprobs),
            }),
        };
        choice["finish_reason"] = finish.into();
        let chunk = self.header.body(self.request.endpoint, true, vec![choice]);
        self.out.push_back(chunk.to_string());
    }

    fn fail(&mut self, error: ApiError) {
        self.out.push_back(error.body().to_string());
        self.out.push_back("[DONE]".into());
        self.ended = true;
    }
}
