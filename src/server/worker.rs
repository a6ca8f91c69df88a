//! The model's own thread: it owns the scheduler, takes new sequences between
//! steps and sends each request its tokens. The async runtime never runs the model.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::heap::HeapTrim;
use super::metrics::Metrics;
use crate::Engine;
use crate::error::{Error, Result};
use crate::generate::{SchedulerOptions, SequenceRequest, StepEvent, TokenEvent};
use crate::model::SequenceId;
use crate::trace::RunObserver;

/// What a request hears about its sequence.
#[derive(Debug)]
pub enum SequenceEvent {
    Token(TokenEvent),
    Failed(Error),
    /// The server is shutting down.
    Aborted,
}

pub struct Submission {
    pub request: SequenceRequest,
    /// The sequence id once queued, or why it was refused.
    pub accepted: oneshot::Sender<Result<SequenceId>>,
    pub events: mpsc::UnboundedSender<SequenceEvent>,
}

enum Command {
    Submit(Submission),
    Shutdown,
}

/// The handle the HTTP side holds.
#[derive(Clone)]
pub struct WorkerHandle {
    commands: std_mpsc::Sender<Command>,
}

impl WorkerHandle {
    /// Starts the model thread; `observer` sees every routing it runs and is
    /// handed back when the thread stops.
    pub fn spawn(
        engine: Arc<Engine>,
        opts: SchedulerOptions,
        metrics: Arc<Metrics>,
        observer: RunObserver,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<RunObserver>)> {
        let (tx, rx) = std_mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("switchyard-model".into())
            .spawn(move || {
                let mut worker = Worker::new(&engine, opts, metrics, observer);
                worker.run(rx);
                worker.observer
            })?;
        Ok((Self { commands: tx }, thread))
    }

    pub fn submit(&self, submission: Submission) -> bool {
        self.commands.send(Command::Submit(submission)).is_ok()
    }

    /// Ends every sequence (each request hears `Aborted`) and stops the thread.
    pub fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown);
    }
}

struct Client {
    events: mpsc::UnboundedSender<SequenceEvent>,
    submitted: Instant,
    last_token: Option<Instant>,
}

struct Worker<'e> {
    engine: &'e Engine,
    scheduler: crate::generate::Scheduler<'e>,
    clients: HashMap<SequenceId, Client>,
    metrics: Arc<Metrics>,
    /// Every routing since start: what `/metrics` reports as experts per token,
    /// and what `--trace` writes.
    observer: RunObserver,
    heap: HeapTrim,
}

impl<'e> Worker<'e> {
    fn new(
        engine: &'e Engine,
        opts: SchedulerOptions,
        metrics: Arc<Metrics>,
        observer: RunObserver,
    ) -> Self {
        Self {
            engine,
            scheduler: engine.scheduler(opts),
            clients: HashMap::new(),
            metrics,
            observer,
            heap: HeapTrim::new(),
        }
    }

    fn run(&mut self, commands: std_mpsc::Receiver<Command>) {
        loop {
            // Idle: sleep until a request comes. Busy: take what arrived, then step.
            if self.scheduler.is_idle() {
                match commands.recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return;
                        }
                    }
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        self.abort_all();
                        return;
                    }
                }
            }
            self.drop_disconnected();
            if !self.scheduler.is_idle() {
                self.step();
            }
            self.heap.maybe_trim(self.scheduler.is_idle());
            self.publish();
        }
    }

    /// False when the thread should stop.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(s) => {
                match self.scheduler.add(s.request) {
                    Ok(id) => {
                        self.clients.insert(
                            id,
                            Client {
                                events: s.events,
                                submitted: Instant::now(),
                                last_token: None,
                            },
                        );
                        if s.accepted.send(Ok(id)).is_err() {
                            self.cancel(id);
                        }
                    }
                    Err(e) => {
                        let _ = s.accepted.send(Err(e));
                    }
                }
                true
            }
            Command::Shutdown => {
                self.abort_all();
                self.publish();
                false
            }
        }
    }

    fn abort_all(&mut self) {
        let ids: Vec<SequenceId> = self.scheduler.sequence_ids().collect();
        for id in ids {
            if let Some(c) = self.clients.get(&id) {
                let _ = c.events.send(SequenceEvent::Aborted);
            }
            self.cancel(id);
        }
    }

    fn cancel(&mut self, id: SequenceId) {
        self.scheduler.cancel(id);
        self.clients.remove(&id);
    }

    /// A client that went away (disconnected, or stopped reading after a stop
    /// sequence) frees its sequence before the next step.
    fn drop_disconnected(&mut self) {
        let gone: Vec<SequenceId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.metrics.cancelled.inc();
            self.cancel(id);
        }
    }

    fn step(&mut self) {
        let start = Instant::now();
        let scheduler = &mut self.scheduler;
        let observer = &mut self.observer;
        let events = crate::ops::on_pool(|| scheduler.step(observer));
        let now = Instant::now();
        // Before any client hears of this step, so what it reads in /metrics is current.
        self.publish();
        let mut tokens = 0u64;
        for event in events {
            match event {
                StepEvent::Token(t) => {
                    tokens += 1;
                    let id = t.sequence;
                    let finished = t.finish.is_some();
                    let Some(client) = self.clients.get_mut(&id) else {
                        continue;
                    };
                    match client.last_token {
                        None => self
                            .metrics
                            .time_to_first_token
                            .observe((now - client.submitted).as_secs_f64()),
                        Some(prev) => self
                            .metrics
                            .inter_token_latency
                            .observe((now - prev).as_secs_f64()),
                    }
                    client.last_token = Some(now);
                    if client.events.send(SequenceEvent::Token(t)).is_err() {
                        self.metrics.cancelled.inc();
                        self.cancel(id);
                    } else if finished {
                        self.clients.remove(&id);
                    }
                }
                StepEvent::Failed { sequence, error } => {
                    tracing::error!("sequence {sequence} failed: {error}");
                    if let Some(client) = self.clients.remove(&sequence) {
                        let _ = client.events.send(SequenceEvent::Failed(error));
                    }
                }
            }
        }
        self.metrics.record_step(tokens, now - start);
    }

    fn publish(&self) {
        let m = &self.metrics;
        m.running.set(self.scheduler.running_len() as u64);
        m.waiting.set(self.scheduler.waiting_len() as u64);
        m.kv_reserved_bytes
            .set(self.scheduler.reserved_kv_bytes() as u64);
        m.kv_allocated_bytes
            .set(self.scheduler.allocated_kv_bytes() as u64);
        m.expert_resident_bytes
            .set(self.engine.resident_expert_bytes() as u64);
        m.record_routing(self.observer.active());
    }
}
