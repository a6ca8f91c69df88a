//! Request bodies of `/v1/completions` and `/v1/chat/completions`, checked field
//! by field into one [`Generation`]. Every refusal names the field at fault.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;
use crate::generate::{ChatMessage, SamplingParams};

/// OpenAI's bound on `top_logprobs`.
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// Parses a JSON body; errors name the path of the bad field (`messages[0].role`).
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::invalid("", format!("the body is not valid JSON: {inner}"));
        }
        let mut why = inner.to_string();
        // serde's words for a field of several accepted shapes name our enum, not the API's.
        for (name, expected) in [
            (
                "ContentField",
                "expected a string or a list of {\"type\": \"text\", \"text\": ...} parts",
            ),
            ("StopField", "expected a string or a list of strings"),
            (
                "PromptField",
                "expected a string, a list of one string, or a list of token ids",
            ),
        ] {
            if why.contains(&format!("untagged enum {name}")) {
                why = expected.to_string();
            }
        }
        if path == "." {
            ApiError::invalid("", format!("invalid request body: {why}"))
        } else {
            ApiError::invalid(&path, format!("{path}: {why}"))
        }
    })
}

/// A checked `/v1/completions` body.
#[derive(Debug, Clone)]
pub struct CompletionBody {
    pub prompt: CompletionPrompt,
    pub generation: Generation,
}

/// A checked `/v1/chat/completions` body.
#[derive(Debug, Clone)]
pub struct ChatBody {
    pub messages: Vec<ChatMessage>,
    pub tools: ToolUse,
    pub generation: Generation,
}

/// The fields both endpoints share and the endpoint's own, with `model` asked
/// about the `model` field before either is checked.
fn parse_request<R: DeserializeOwned>(
    body: &[u8],
    model: impl FnOnce(Option<&str>) -> Result<(), ApiError>,
) -> Result<(CommonFields, R), ApiError> {
    let common: CommonFields = parse_body(body)?;
    let req: R = parse_body(body)?;
    model(common.model.as_deref())?;
    Ok((common, req))
}

/// Everything a `/v1/completions` body controls, checked before the engine sees
/// it: pure, so the fuzz target drives exactly what the route runs. `model`
/// is asked about the `model` field before the other fields are checked.
pub fn completion_body(
    body: &[u8],
    model: impl FnOnce(Option<&str>) -> Result<(), ApiError>,
) -> Result<CompletionBody, ApiError> {
    let (common, req) = parse_request::<CompletionRequest>(body, model)?;
    let (prompt, generation) = req.check(&common)?;
    Ok(CompletionBody { prompt, generation })
}

/// [`completion_body`] for `/v1/chat/completions`.
pub fn chat_body(
    body: &[u8],
    model: impl FnOnce(Option<&str>) -> Result<(), ApiError>,
) -> Result<ChatBody, ApiError> {
    let (common, req) = parse_request::<ChatRequest>(body, model)?;
    let (messages, tools, generation) = req.check(&common)?;
    Ok(ChatBody {
        messages,
        tools,
        generation,
    })
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields both endpoints share, read from the same body as the endpoint's
/// own (not `#[serde(flatten)]`ed into it, which would lose the field names in errors).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonFields {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not in OpenAI's API; vLLM and llama-server accept it.
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptField,
    /// The legacy form: how many alternatives to report per token.
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ContentField {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RequestMessage {
    pub role: String,
    pub content: Option<ContentField>,
    pub tool_calls: Option<Vec<Value>>,
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<RequestMessage>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
}

/// What a request asks of the model, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// `None`: as many as the context leaves.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub top_logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

impl CommonFields {
    /// Checks the shared fields. `max_tokens` is the value the endpoint reads
    /// (chat prefers `max_completion_tokens`), named `max_tokens_field`.
    pub fn generation(
        &self,
        max_tokens: Option<i64>,
        max_tokens_field: &str,
        top_logprobs: Option<i64>,
    ) -> Result<Generation, ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid(
                "n",
                format!("n must be 1 (one choice per request), got {n}"),
            ));
        }
        for (field, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(
                    field,
                    format!("{field} is not supported; leave it out or set it to 0"),
                ));
            }
        }
        if self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(ApiError::invalid(
                "logit_bias",
                "logit_bias is not supported",
            ));
        }
        let max_tokens = match max_tokens {
            None => None,
            Some(n) if n < 1 => {
                return Err(ApiError::invalid(
                    max_tokens_field,
                    format!("{max_tokens_field} must be at least 1, got {n}"),
                ));
            }
            Some(n) => Some(n as usize),
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
            return Err(ApiError::invalid(
                "temperature",
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(ApiError::invalid(
                "top_p",
                format!("top_p must be in (0, 1], got {p}"),
            ));
        }
        let top_k = match self.top_k {
            // -1 and 0 mean "off" in vLLM and llama-server.
            None | Some(-1) | Some(0) => None,
            Some(k) if k < 0 => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("top_k must be at least 1 (or 0/-1 for off), got {k}"),
                ));
            }
            Some(k) => Some(k as usize),
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stop.len() > 4 {
            return Err(ApiError::invalid(
                "stop",
                format!("stop takes at most 4 sequences, got {}", stop.len()),
            ));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop",
                "stop sequences must not be empty",
            ));
        }
        let top_logprobs = match top_logprobs {
            None => None,
            Some(k) if !(0..=MAX_TOP_LOGPROBS).contains(&k) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
                ));
            }
            Some(k) => Some(k as usize),
        };
        Ok(Generation {
            max_tokens,
            sampling: SamplingParams {
                temperature,
                top_k,
                top_p: self.top_p,
                // Without a seed every request draws differently, as OpenAI's do.
                seed: self.seed.map_or_else(fresh_seed, |s| s as u64),
            },
            stop,
            top_logprobs,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    }
}

fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// What the prompt of a completion request is.
#[derive(Debug, Clone)]
pub enum CompletionPrompt {
    Text(String),
    Ids(Vec<u32>),
}

impl CompletionRequest {
    pub fn check(&self, common: &CommonFields) -> Result<(CompletionPrompt, Generation), ApiError> {
        if self.echo {
            return Err(ApiError::invalid("echo", "echo is not supported"));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid("suffix", "suffix is not supported"));
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(ApiError::invalid("best_of", "best_of must be 1"));
        }
        let one = |n: usize| {
            Err(ApiError::invalid(
                "prompt",
                format!(
                    "prompt must be one prompt (batches of prompts are not supported), got {n}"
                ),
            ))
        };
        let prompt = match &self.prompt {
            PromptField::Text(t) => CompletionPrompt::Text(t.clone()),
            PromptField::Texts(v) if v.len() == 1 => CompletionPrompt::Text(v[0].clone()),
            PromptField::Texts(v) => return one(v.len()),
            PromptField::Ids(ids) => CompletionPrompt::Ids(ids.clone()),
            PromptField::IdLists(v) if v.len() == 1 => CompletionPrompt::Ids(v[0].clone()),
            PromptField::IdLists(v) => return one(v.len()),
        };
        if matches!(&prompt, CompletionPrompt::Text(t) if t.is_empty())
            || matches!(&prompt, CompletionPrompt::Ids(ids) if ids.is_empty())
        {
            return Err(ApiError::invalid("prompt", "prompt is empty"));
        }
        let generation = common.generation(common.max_tokens, "max_tokens", self.logprobs)?;
        Ok((prompt, generation))
    }
}

/// Whether the request's tools go to the template and tool calls are parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolUse {
    pub tools: Option<Value>,
}

impl ChatRequest {
    pub fn check(
        &self,
        common: &CommonFields,
    ) -> Result<(Vec<ChatMessage>, ToolUse, Generation), ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        let messages = self
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| chat_message(i, m))
            .collect::<Result<Vec<_>, _>>()?;
        let tools = self.tool_use()?;
        let top_logprobs = match (self.logprobs, self.top_logprobs) {
            (false, Some(_)) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "top_logprobs needs logprobs: true",
                ));
            }
            (false, None) => None,
            (true, k) => Some(k.unwrap_or(0)),
        };
        let (max_tokens, field) = match self.max_completion_tokens {
            Some(n) => (Some(n), "max_completion_tokens"),
            None => (self.max_tokens, "max_tokens"),
        };
        let generation = common.generation(max_tokens, field, top_logprobs)?;
        Ok((messages, tools, generation))
    }

    fn tool_use(&self) -> Result<ToolUse, ApiError> {
        let tools = match &self.tools {
            Some(t) if !t.is_empty() => t,
            _ => return Ok(ToolUse { tools: None }),
        };
        for (i, tool) in tools.iter().enumerate() {
            let name = tool.pointer("/function/name").and_then(Value::as_str);
            if tool.get("type").and_then(Value::as_str) != Some("function") || name.is_none() {
                return Err(ApiError::invalid(
                    &format!("tools[{i}]"),
                    format!(
                        "tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                    ),
                ));
            }
        }
        match self.tool_choice.as_ref() {
            None => Ok(ToolUse {
                tools: Some(Value::Array(tools.clone())),
            }),
            Some(Value::String(s)) if s == "auto" => Ok(ToolUse {
                tools: Some(Value::Array(tools.clone())),
            }),
            Some(Value::String(s)) if s == "none" => Ok(ToolUse { tools: None }),
            Some(other) => Err(ApiError::invalid(
                "tool_choice",
                format!(
                    "tool_choice {other} is not supported: forcing a call needs constrained decoding; use \"auto\" or \"none\""
                ),
            )),
        }
    }
}

fn chat_message(i: usize, m: &RequestMessage) -> Result<ChatMessage, ApiError> {
    if !ROLES.contains(&m.role.as_str()) {
        return Err(ApiError::invalid(
            &format!("messages[{i}].role"),
            format!(
                "messages[{i}].role {:?} is not one of {}",
                m.role,
                ROLES.join(", ")
            ),
        ));
    }
    let content = match &m.content {
        None => String::new(),
        Some(ContentField::Text(t)) => t.clone(),
        Some(ContentField::Parts(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match (part.kind.as_str(), &part.text) {
                    ("text", Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            &format!("messages[{i}].content[{j}]"),
                            format!(
                                "messages[{i}].content[{j}]: only {{\"type\": \"text\", \"text\": ...}} parts are supported, got type {:?}",
                                part.kind
                            ),
                        ));
                    }
                }
            }
            text
        }
    };
    if m.content.is_none() && m.tool_calls.is_none() {
        return Err(ApiError::invalid(
            &format!("messages[{i}].content"),
            format!("messages[{i}] has no content"),
        ));
    }
    let tool_calls = m
        .tool_calls
        .as_ref()
        .map(|calls| Value::Array(calls.iter().map(template_tool_call).collect()));
    Ok(ChatMessage {
        role: m.role.clone(),
        content,
        tool_calls,
        tool_call_id: m.tool_call_id.clone(),
        name: m.name.clone(),
    })
}

/// OpenAI sends `arguments` as a JSON string; the Hub's templates expect the
/// object (they `tojson` it), as transformers' callers pass it.
fn template_tool_call(call: &Value) -> Value {
    let mut call = call.clone();
    if let Some(args) = call.pointer_mut("/function/arguments")
        && let Some(text) = args.as_str()
        && let Ok(parsed) = serde_json::from_str::<Value>(text)
    {
        *args = parsed;
    }
    call
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<ChatRequest, ApiError> {
        parse_body(body.as_bytes())
    }

    fn check(body: &str) -> Result<Generation, ApiError> {
        let common: CommonFields = parse_body(body.as_bytes())?;
        Ok(chat(body)?.check(&common)?.2)
    }

    #[test]
    fn bad_fields_are_named() {
        let err = chat(r#"{"messages": [{"role": 3, "content": "x"}]}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[0].role"));
        let err = chat(r#"{"messages": "#).unwrap_err();
        assert!(err.message.contains("not valid JSON"), "{}", err.message);
        let err = check(r#"{"messages": [{"role": "wizard", "content": "x"}]}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[0].role"));
        let err = check(r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}"#);
        assert!(err.unwrap_err().message.contains("-3"));
        let err = check(r#"{"messages": [{"role": "user", "content": "x"}], "n": 2}"#);
        assert_eq!(err.unwrap_err().param.as_deref(), Some("n"));
        let err = check(r#"{"messages": [{"role": "user", "content": "x"}], "top_p": "x"}"#);
        assert_eq!(err.unwrap_err().param.as_deref(), Some("top_p"));
        let g = check(r#"{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 5, "stop": "a", "seed": 3}"#).unwrap();
        assert_eq!(
            (g.max_tokens, g.stop, g.sampling.seed),
            (Some(5), vec!["a".to_string()], 3)
        );
    }

    #[test]
    fn tool_call_arguments_reach_the_template_as_objects() {
        let req = chat(
            r#"{"messages": [{"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]}]}"#,
        )
        .unwrap();
        let (messages, _, _) = req.check(&CommonFields::default()).unwrap();
        let calls = messages[0].tool_calls.as_ref().unwrap();
        assert_eq!(calls[0]["function"]["arguments"]["x"], 1);
    }
}
