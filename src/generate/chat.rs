//! Chat prompts rendered from the checkpoint's Jinja `chat_template`
//! (`tokenizer_config.json`, or `chat_template.jinja` as transformers 5 writes it).

use std::path::Path;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use minijinja::{Environment, ErrorKind, context};
use serde::{Deserialize, Serialize};

use super::tokenizer::TokenizerConfig;
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls, `[{"id", "type": "function", "function": {"name",
    /// "arguments": {...}}}]`, as the Hub's templates read them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A `tool` turn: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

/// Limits a template runs under: it is code from a file, and must neither hang
/// nor fill memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateLimits {
    /// minijinja's fuel: one per instruction, and one per 64 bytes of every string,
    /// list or output the template makes (checked before large allocations). Real
    /// chat templates use a few hundred per message; the default bounds a render to
    /// about 2M instructions or 128 MB of data.
    pub fuel: u64,
    /// Bytes one render may write (the prompt), and the template source's own size.
    pub max_bytes: usize,
    /// Nesting of macro calls, includes and recursive loops.
    pub recursion: usize,
    /// Wall-clock bound on one render. Fuel misses some work: minijinja 3.1 keeps
    /// `list + list` lazy and walks the whole chain, shared halves included, to
    /// measure its depth, so a loop doubling a namespace list spins without
    /// charging fuel (neither the output cap nor the recursion limit sees it
    /// either). Past this the render is abandoned: the caller gets an error, and
    /// the thread, which nothing can interrupt, runs on until it finishes.
    pub timeout: std::time::Duration,
    /// Abandoned renders still running (in the whole process) past which new
    /// renders are refused, so that a template that spins holds at most this many
    /// threads instead of one per request.
    pub max_stuck: usize,
}

impl Default for TemplateLimits {
    fn default() -> Self {
        Self {
            fuel: 2_000_000,
            max_bytes: 64 << 20,
            recursion: 100,
            timeout: std::time::Duration::from_secs(10),
            max_stuck: 4,
        }
    }
}

/// A checkpoint's chat template. It is compiled on first use, so a broken one
/// only fails the commands that render a chat; errors name where it came from.
pub struct ChatTemplate {
    source: String,
    origin: String,
    limits: TemplateLimits,
    compiled: OnceLock<std::result::Result<Arc<Environment<'static>>, String>>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// The model directory's chat template, or `None` if it has none.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let config = TokenizerConfig::read(dir)?;
        let jinja = dir.join("chat_template.jinja");
        let (source, origin) = if jinja.exists() {
            let text = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
            (Some(text), jinja)
        } else {
            (
                config.as_ref().and_then(|c| c.chat_template()),
                dir.join("tokenizer_config.json"),
            )
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let token = |key| config.as_ref().and_then(|c| c.token(key));
        Ok(Some(
            Self::new(source, token("bos_token"), token("eos_token"))?
                .with_origin(origin.display().to_string()),
        ))
    }

    pub fn new(
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        Ok(Self {
            source,
            origin: "chat template".into(),
            limits: TemplateLimits::default(),
            compiled: OnceLock::new(),
            bos_token,
            eos_token,
        })
    }

    /// Names the template's source in errors (a file, or a GGUF key).
    pub fn with_origin(mut self, origin: String) -> Self {
        self.origin = origin;
        self
    }

    pub fn with_limits(mut self, limits: TemplateLimits) -> Self {
        self.limits = limits;
        self.compiled = OnceLock::new();
        self
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Compiles the template (once); later calls return the first outcome.
    pub fn check(&self) -> Result<()> {
        self.environment().map(|_| ())
    }

    fn environment(&self) -> Result<&Arc<Environment<'static>>> {
        self.compiled
            .get_or_init(|| compile(&self.source, self.limits).map(Arc::new))
            .as_ref()
            .map_err(|e| Error::ChatTemplate(format!("{}: {e}", self.origin)))
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`ChatTemplate::render`] with the request's `tools` (OpenAI function
    /// schemas) in the template's `tools` variable, as transformers passes them.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let bad = |e: String| Error::ChatTemplate(format!("{}: {e}", self.origin));
        let env = self.environment()?.clone();
        let limits = self.limits;
        let ctx = context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            tools => tools.map(|t| minijinja::Value::from(minijinja::value::Serde(t))),
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        let stuck = stuck_renders();
        if stuck >= limits.max_stuck {
            return Err(bad(format!(
                "{stuck} earlier renders are still running past their time bound; \
                 refusing new renders until they end"
            )));
        }
        // On its own thread, so that a render fuel does not stop cannot hold the caller.
        let (send, receive) = std::sync::mpsc::sync_channel(1);
        let state = Arc::new(AtomicU8::new(RUNNING));
        let thread_state = state.clone();
        std::thread::Builder::new()
            .name("chat-template".into())
            .spawn(move || {
                let _ = send.send(render_capped(&env, ctx, limits));
                if thread_state
                    .compare_exchange(RUNNING, FINISHED, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    // Abandoned by its caller, which counted it as stuck.
                    STUCK_RENDERS.fetch_sub(1, Ordering::AcqRel);
                }
            })
            .map_err(|e| bad(format!("cannot start the render thread: {e}")))?;
        if let Ok(rendered) = receive.recv_timeout(limits.timeout) {
            return rendered.map_err(bad);
        }
        // Counted before the thread can see it abandoned, so the count never wraps.
        STUCK_RENDERS.fetch_add(1, Ordering::AcqRel);
        if state
            .compare_exchange(RUNNING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // It finished just now: its result is in the channel.
            STUCK_RENDERS.fetch_sub(1, Ordering::AcqRel);
            if let Ok(rendered) = receive.recv() {
                return rendered.map_err(bad);
            }
        }
        Err(bad(format!(
            "the render did not finish within {:?} (a runaway loop?)",
            limits.timeout
        )))
    }
}

/// A render thread's state, shared with the caller that waits for it.
const RUNNING: u8 = 0;
const FINISHED: u8 = 1;
const ABANDONED: u8 = 2;

/// Renders abandoned at their time bound whose threads still run.
static STUCK_RENDERS: AtomicUsize = AtomicUsize::new(0);

/// Chat-template renders abandoned at their time bound and still running, in the
/// whole process ([`TemplateLimits::max_stuck`] bounds them).
pub fn stuck_renders() -> usize {
    STUCK_RENDERS.load(Ordering::Acquire)
}

fn render_capped(
    env: &Environment<'static>,
    ctx: minijinja::Value,
    limits: TemplateLimits,
) -> std::result::Result<String, String> {
    let template = env.get_template("chat").map_err(|e| e.to_string())?;
    let mut out = CappedWriter {
        bytes: Vec::new(),
        cap: limits.max_bytes,
        exceeded: false,
    };
    let rendered = template.render_captured_to(ctx, &mut out);
    if out.exceeded {
        return Err(format!(
            "the rendered prompt exceeds {} bytes",
            limits.max_bytes
        ));
    }
    match rendered {
        Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(format!(
            "gave up after {} fuel of template work (a runaway loop?)",
            limits.fuel
        )),
        Err(e) => Err(e.to_string()),
        Ok(_) => String::from_utf8(out.bytes).map_err(|e| e.to_string()),
    }
}

fn compile(
    source: &str,
    limits: TemplateLimits,
) -> std::result::Result<Environment<'static>, String> {
    if source.len() > limits.max_bytes {
        return Err(format!(
            "the template is {} bytes, more than {}",
            source.len(),
            limits.max_bytes
        ));
    }
    let mut env = Environment::new();
    env.set_fuel(Some(limits.fuel));
    env.set_recursion_limit(limits.recursion);
    // HF templates call Python string methods (`.strip()`, `.startswith()`).
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_template_owned("chat", source.to_string())
        .map_err(|e| e.to_string())?;
    Ok(env)
}

/// A render's output, refused past `cap` bytes (the write error stops the render).
struct CappedWriter {
    bytes: Vec<u8>,
    cap: usize,
    exceeded: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len().saturating_add(buf.len()) > self.cap {
            self.exceeded = true;
            return Err(std::io::Error::other("rendered prompt too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
