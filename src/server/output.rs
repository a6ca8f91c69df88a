//! Tokens to the text a client sees: stop sequences cut the text (and end the
//! sequence), and with tools a `<tool_call>` block is held back and parsed.
//!
//! Text that could still be the start of a stop sequence or of `<tool_call>` is
//! held back until the next token settles it, so a stream never shows what the
//! final answer leaves out.

use serde_json::{Value, json};

use crate::error::Result;
use crate::generate::{TextStream, TextTokenizer};

const TOOL_OPEN: &str = "<tool_call>";
const TOOL_CLOSE: &str = "</tool_call>";

pub struct TextAssembler<'t> {
    stream: TextStream<'t>,
    stops: Vec<String>,
    tools: bool,
    /// Decoded, not yet handed out.
    held: String,
    /// Everything from the first `<tool_call>` on (never handed out as content).
    tool_text: Option<String>,
    stopped: bool,
}

impl<'t> TextAssembler<'t> {
    pub fn new(tokenizer: &'t TextTokenizer, stops: Vec<String>, tools: bool) -> Self {
        Self {
            stream: tokenizer.stream(),
            stops,
            tools,
            held: String::new(),
            tool_text: None,
            stopped: false,
        }
    }

    /// True once a stop sequence was seen: the generation is over.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds a token; returns the text now safe to hand out.
    pub fn push(&mut self, token: u32) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        if let Some(piece) = self.stream.push(token)? {
            match &mut self.tool_text {
                Some(t) => t.push_str(&piece),
                None => self.held.push_str(&piece),
            }
        }
        if let Some(tool_text) = &mut self.tool_text {
            // Stop sequences still end a tool call's text.
            if let Some(at) = earliest(tool_text, &self.stops) {
                tool_text.truncate(at);
                self.stopped = true;
            }
            return Ok(String::new());
        }
        if let Some(at) = earliest(&self.held, &self.stops) {
            self.held.truncate(at);
            self.stopped = true;
            return Ok(std::mem::take(&mut self.held));
        }
        if self.tools
            && let Some(at) = self.held.find(TOOL_OPEN)
        {
            self.tool_text = Some(self.held.split_off(at));
            return Ok(std::mem::take(&mut self.held));
        }
        let keep = self.holdback();
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        Ok(out)
    }

    /// The held-back text and the parsed tool calls, at the end of generation.
    pub fn finish(mut self) -> (String, Vec<ToolCall>) {
        let mut text = std::mem::take(&mut self.held);
        let Some(tool_text) = self.tool_text.take() else {
            return (text, Vec::new());
        };
        let (calls, rest) = parse_tool_calls(&tool_text);
        if calls.is_empty() {
            // Not a well-formed call: the client gets the text as it was written.
            text.push_str(&tool_text);
        } else {
            text.push_str(&rest);
        }
        (text, calls)
    }

    /// Bytes at the end of `held` that begin a stop sequence or `<tool_call>`.
    fn holdback(&self) -> usize {
        let tool = self.tools.then_some(TOOL_OPEN);
        let patterns = self.stops.iter().map(String::as_str).chain(tool);
        let mut keep = 0;
        for p in patterns {
            for (i, _) in self.held.char_indices() {
                let tail = &self.held[i..];
                if tail.len() <= keep {
                    break;
                }
                if tail.len() < p.len() && p.starts_with(tail) {
                    keep = tail.len();
                    break;
                }
            }
        }
        keep
    }
}

fn earliest(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// JSON text, as OpenAI's API carries it.
    pub arguments: String,
}

impl ToolCall {
    pub fn to_json(&self, id: &str, index: Option<usize>) -> Value {
        let mut v = json!({
            "id": id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        });
        if let Some(i) = index {
            v["index"] = json!(i);
        }
        v
    }
}

/// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Qwen and
/// Hermes templates) and the text outside them. A block without its closing tag
/// at the end of the output (generation cut short) still counts if its JSON is whole.
pub fn parse_tool_calls(text: &str) -> (Vec<ToolCall>, String) {
    let mut calls = Vec::new();
    let mut rest = String::new();
    let mut tail = text;
    while let Some(open) = tail.find(TOOL_OPEN) {
        rest.push_str(&tail[..open]);
        let body_start = open + TOOL_OPEN.len();
        let (body, next) = match tail[body_start..].find(TOOL_CLOSE) {
            Some(close) => (
                &tail[body_start..body_start + close],
                &tail[body_start + close + TOOL_CLOSE.len()..],
            ),
            None => (&tail[body_start..], ""),
        };
        match parse_call(body) {
            Some(call) => calls.push(call),
            None => return (Vec::new(), text.to_string()),
        }
        tail = next;
    }
    rest.push_str(tail);
    (calls, rest.trim().to_string())
}

fn parse_call(body: &str) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        None => "{}".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    Some(ToolCall { name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> TextTokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo");
        TextTokenizer::from_dir(&dir).unwrap()
    }

    fn assemble(text: &str, stops: &[&str], tools: bool) -> (Vec<String>, String, Vec<ToolCall>) {
        let tok = tokenizer();
        let ids = tok.encode(text, false).unwrap();
        let mut a = TextAssembler::new(&tok, stops.iter().map(|s| s.to_string()).collect(), tools);
        let mut pieces = Vec::new();
        for id in ids {
            pieces.push(a.push(id).unwrap());
            if a.stopped() {
                break;
            }
        }
        let (tail, calls) = a.finish();
        let all = pieces.concat() + &tail;
        (pieces, all, calls)
    }

    #[test]
    fn stop_sequences_cut_the_text_and_never_leak_into_the_stream() {
        let (pieces, all, _) = assemble("The cat sat. The dog ran.", &["dog"], false);
        assert_eq!(all, "The cat sat. The ");
        assert!(pieces.iter().all(|p| !p.contains('d')), "{pieces:?}");
        let (_, all, _) = assemble("no stop here", &["zebra"], false);
        assert_eq!(all, "no stop here");
    }

    #[test]
    fn tool_calls_are_parsed_out_of_the_text() {
        let text = "Let me check.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let (pieces, all, calls) = assemble(text, &[], true);
        assert_eq!(all, "Let me check.");
        assert!(pieces.iter().all(|p| !p.contains('<')), "{pieces:?}");
        assert_eq!(
            calls,
            vec![ToolCall {
                name: "get_weather".into(),
                arguments: "{\"city\":\"Paris\"}".into()
            }]
        );
        // Without tools the same text is plain content.
        let (_, all, calls) = assemble(text, &[], false);
        assert_eq!(all, text);
        assert!(calls.is_empty());
        // A malformed block stays text.
        let (calls, rest) = parse_tool_calls("<tool_call>{not json</tool_call>");
        assert!(calls.is_empty());
        assert_eq!(rest, "<tool_call>{not json</tool_call>");
    }
}
