//! Reverse-mode autograd.
//!
//! An op whose inputs take part in autograd attaches a `Node` to its output: links to the
//! inputs' nodes and a backward closure holding what it saved (detached tensors). Leaves
//! (parameters) carry a `GradSlot` where gradients accumulate until cleared. `backward`
//! walks the nodes in reverse topological order, running each closure once and dropping it
//! straight after, so saved activations are freed as soon as they have been used.
//! Tensors without a node (frozen weights, data, anything under `no_grad`) record nothing.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Gradients for each input of an op, given the gradient of its output and which inputs
/// need one (`None` where not needed).
pub type BackwardFn = Box<dyn FnOnce(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

pub struct Node {
    id: u64,
    /// Name of the op that made the tensor (for errors and debugging).
    pub op: &'static str,
    inputs: Vec<Option<Arc<Node>>>,
    backward: Mutex<Option<BackwardFn>>,
    slot: Option<Arc<GradSlot>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({} #{})", self.op, self.id)
    }
}

/// Where a leaf's gradient accumulates; shared by every version of a parameter's value.
#[derive(Default)]
pub struct GradSlot(Mutex<Option<Tensor>>);

impl GradSlot {
    pub fn get(&self) -> Option<Tensor> {
        lock(&self.0).clone()
    }
    pub fn take(&self) -> Option<Tensor> {
        lock(&self.0).take()
    }
    pub fn set(&self, g: Option<Tensor>) {
        *lock(&self.0) = g;
    }
    fn accumulate(&self, g: Tensor) -> Result<()> {
        let mut s = lock(&self.0);
        *s = Some(match s.take() {
            Some(prev) => prev.add(&g)?,
            None => g,
        });
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static NO_GRAD_DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// While alive, ops on this thread record nothing (sampling, reference passes, optimizer).
pub struct NoGradGuard(());

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        NO_GRAD_DEPTH.with(|d| d.set(d.get() - 1));
    }
}

pub fn no_grad() -> NoGradGuard {
    NO_GRAD_DEPTH.with(|d| d.set(d.get() + 1));
    NoGradGuard(())
}

pub fn is_grad_enabled() -> bool {
    NO_GRAD_DEPTH.with(|d| d.get() == 0)
}

/// Attaches a node to `out` when grad mode is on and some input takes part in autograd.
/// `backward` receives the output's gradient; it should capture detached tensors only.
pub(crate) fn record(
    op: &'static str,
    out: Tensor,
    inputs: &[&Tensor],
    backward: impl FnOnce(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Tensor {
    if !is_grad_enabled() || inputs.iter().all(|t| t.node().is_none()) {
        return out;
    }
    let node = Node {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        op,
        inputs: inputs.iter().map(|t| t.node().cloned()).collect(),
        backward: Mutex::new(Some(Box::new(backward))),
        slot: None,
    };
    out.with_node(Some(Arc::new(node)))
}

/// Whether any of `inputs` will record (for ops that save extra tensors only then).
pub(crate) fn will_record(inputs: &[&Tensor]) -> bool {
    is_grad_enabled() && inputs.iter().any(|t| t.node().is_some())
}

impl Tensor {
    /// This tensor as a leaf whose gradient accumulates in a fresh slot (`grad()`).
    pub fn requires_grad(&self) -> Tensor {
        self.with_slot(Arc::new(GradSlot::default()))
    }

    /// This tensor as a leaf accumulating into `slot`: a parameter keeps its slot across updates.
    pub fn with_slot(&self, slot: Arc<GradSlot>) -> Tensor {
        let node = Node {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            op: "leaf",
            inputs: Vec::new(),
            backward: Mutex::new(None),
            slot: Some(slot),
        };
        self.detach().with_node(Some(Arc::new(node)))
    }

    /// Same storage, no autograd history.
    pub fn detach(&self) -> Tensor {
        self.with_node(None)
    }

    pub fn is_tracked(&self) -> bool {
        self.node().is_some()
    }

    /// The accumulated gradient of a leaf.
    pub fn grad(&self) -> Option<Tensor> {
        self.node().and_then(|n| n.slot.as_ref()).and_then(|s| s.get())
    }

    /// The leaf's gradient slot, if this is a leaf.
    pub fn grad_slot(&self) -> Option<Arc<GradSlot>> {
        self.node().and_then(|n| n.slot.clone())
    }

    pub fn zero_grad(&self) {
        if let Some(s) = self.grad_slot() {
            s.set(None);
        }
    }

    /// Back-propagates from a one-element tensor (a loss) into every leaf it depends on.
    pub fn backward(&self) -> Result<()> {
        if self.numel() != 1 {
            return Err(Error::shape("backward", format!("needs a one-element loss, got shape {:?}", self.shape())));
        }
        let seed = Tensor::full(1.0, self.shape(), &self.device())?;
        self.backward_with(seed)
    }

    /// Back-propagates `grad` (shaped like `self`) into the leaves.
    pub fn backward_with(&self, grad: Tensor) -> Result<()> {
        let Some(root) = self.node().cloned() else {
            return Err(Error::Invalid(
                "backward: the tensor has no autograd history (no input requires grad, or it was made under no_grad)"
                    .into(),
            ));
        };
        if grad.shape() != self.shape() {
            return Err(Error::shape(
                "backward",
                format!("gradient {:?} for a tensor of shape {:?}", grad.shape(), self.shape()),
            ));
        }
        let _guard = no_grad();
        let order = topo_order(&root);
        let mut grads: HashMap<u64, Tensor> = HashMap::new();
        grads.insert(root.id, grad);
        for node in order.iter().rev() {
            let Some(g) = grads.remove(&node.id) else { continue };
            if let Some(slot) = &node.slot {
                slot.accumulate(g)?;
                continue;
            }
            let Some(f) = lock(&node.backward).take() else {
                return Err(Error::Invalid(format!(
                    "backward: the graph through `{}` was already used by an earlier backward; run the forward again",
                    node.op
                )));
            };
            let needs: Vec<bool> = node.inputs.iter().map(|i| i.is_some()).collect();
            let t0 = PROFILE.load(Ordering::Relaxed).then(std::time::Instant::now);
            let input_grads = f(&g, &needs)?;
            drop(g);
            if let Some(t0) = t0 {
                profile_add(node.op, t0.elapsed().as_secs_f64());
            }
            for (inp, ig) in node.inputs.iter().zip(input_grads) {
                let (Some(inp), Some(ig)) = (inp, ig) else { continue };
                let ig = ig.detach();
                match grads.remove(&inp.id) {
                    Some(prev) => grads.insert(inp.id, prev.add(&ig)?),
                    None => grads.insert(inp.id, ig),
                };
            }
        }
        Ok(())
    }
}

static PROFILE: AtomicBool = AtomicBool::new(false);
static PROFILE_TIMES: Mutex<Vec<OpTime>> = Mutex::new(Vec::new());

/// Time spent in the backward functions of one kind of op (`Node::op`), summed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OpTime {
    pub op: &'static str,
    pub seconds: f64,
    pub calls: usize,
}

/// Starts (clearing what was collected) or stops timing each backward function by op. The
/// times are the host's: on the CPU the work itself, on a GPU only the recording of it.
pub fn profile_backward(on: bool) {
    lock(&PROFILE_TIMES).clear();
    PROFILE.store(on, Ordering::Relaxed);
}

/// What `profile_backward` collected since it started, slowest op first.
pub fn backward_profile() -> Vec<OpTime> {
    let mut v = lock(&PROFILE_TIMES).clone();
    v.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    v
}

fn profile_add(op: &'static str, seconds: f64) {
    let mut v = lock(&PROFILE_TIMES);
    match v.iter_mut().find(|t| t.op == op) {
        Some(t) => {
            t.seconds += seconds;
            t.calls += 1;
        }
        None => v.push(OpTime { op, seconds, calls: 1 }),
    }
}

/// Nodes reachable from `root`, each after all of its inputs (iterative DFS).
fn topo_order(root: &Arc<Node>) -> Vec<Arc<Node>> {
    let mut order = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut stack: Vec<(Arc<Node>, bool)> = vec![(root.clone(), false)];
    while let Some((n, expanded)) = stack.pop() {
        if expanded {
            order.push(n);
            continue;
        }
        if !seen.insert(n.id) {
            continue;
        }
        stack.push((n.clone(), true));
        for i in n.inputs.iter().flatten() {
            if !seen.contains(&i.id) {
                stack.push((i.clone(), false));
            }
        }
    }
    order
}

/// Runs `f` on `inputs` without keeping its activations: the forward runs under `no_grad`, and
/// the backward recomputes it with grad on before propagating. Parameters that `f` captures
/// receive their gradients during that recomputation. Output gradients flow to `inputs`.
pub fn checkpoint(
    inputs: &[&Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    let out = {
        let _g = no_grad();
        f(&detached)?
    };
    if !is_grad_enabled() {
        return Ok(out);
    }
    // The block records one node; its saved state is the inputs alone.
    let node = Node {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        op: "checkpoint",
        inputs: inputs.iter().map(|t| t.node().cloned()).collect(),
        backward: Mutex::new(Some(Box::new(move |g: &Tensor, needs: &[bool]| {
            // Re-enable grad for the recomputation inside the outer backward's no_grad.
            let depth = NO_GRAD_DEPTH.with(|d| d.replace(0));
            let result = (|| {
                let leaves: Vec<Tensor> =
                    detached.iter().zip(needs).map(|(t, &n)| if n { t.requires_grad() } else { t.clone() }).collect();
                let y = f(&leaves)?;
                if y.is_tracked() {
                    y.backward_with(g.clone())?;
                }
                Ok(leaves.iter().zip(needs).map(|(l, &n)| if n { l.grad() } else { None }).collect())
            })();
            NO_GRAD_DEPTH.with(|d| d.set(depth));
            result
        }))),
        slot: None,
    };
    Ok(out.with_node(Some(Arc::new(node))))
}
