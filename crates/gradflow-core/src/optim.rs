//! Server-side optimizers: SGD, Adagrad, Adam, AdamW and FTRL-Proximal.
//!
//! Each optimizer is a kernel over flat `f32` slices, so one code path serves a multi-MiB dense
//! partition on a server thread and a short sparse embedding row (dim 8..64) in a tight loop.
//! The per-element state lives in a caller-owned slot-major buffer (slot `s` of a slice of
//! length `n` is `state[s*n..(s+1)*n]`), which keeps the kernels allocation-free and lets the
//! server store the state of a sparse row right next to the row.
//!
//! SGD, Adagrad, Adam and AdamW follow `torch.optim` (with PyTorch's hyperparameter names and
//! defaults) and are checked against trajectories recorded from PyTorch in
//! `tests/optim_reference.rs`. FTRL follows `tf.keras.optimizers.Ftrl`, since PyTorch has none.
//!
//! A step's gradient is a [`Grad`]: a slice, or a sum of pushes averaged as the kernel reads
//! it, so that a server's sync step needs no pass of its own to average (the updates are bound
//! by memory traffic).
//!
//! The arithmetic is done in `f32`: against PyTorch's `float64` trajectories it stays within
//! about 1e-7 relative error, and `f32` lanes vectorize twice as wide as `f64` ones.

use serde::{Deserialize, Serialize};

use crate::CoreError;

/// An optimizer and its hyperparameters.
///
/// Names and defaults follow PyTorch (`torch.optim`); FTRL, which PyTorch lacks, follows
/// `tf.keras.optimizers.Ftrl`. In JSON or TOML the variant is chosen by `kind`
/// (`"sgd"`, `"adagrad"`, `"adam"`, `"adamw"`, `"ftrl"`) and omitted hyperparameters take their
/// defaults; unknown fields are refused so that a misspelt hyperparameter is not silently
/// ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerConfig {
    /// Stochastic gradient descent with optional momentum, exactly as `torch.optim.SGD`:
    ///
    /// ```text
    /// g = grad + weight_decay * p
    /// if momentum > 0:
    ///     buf = g                                        on the first step (t == 1)
    ///     buf = momentum * buf + (1 - dampening) * g     afterwards
    ///     g = g + momentum * buf    if nesterov    else    g = buf
    /// p -= lr * g
    /// ```
    ///
    /// State: one slot (the momentum buffer) when `momentum > 0`, else none.
    Sgd {
        /// Learning rate (required).
        lr: f64,
        /// Momentum factor. Default 0 (plain SGD).
        #[serde(default)]
        momentum: f64,
        /// Dampening of the momentum. Default 0.
        #[serde(default)]
        dampening: f64,
        /// Nesterov momentum; needs `momentum > 0` and `dampening == 0`. Default false.
        #[serde(default)]
        nesterov: bool,
        /// L2 penalty added to the gradient. Default 0.
        #[serde(default)]
        weight_decay: f64,
        /// Clip each gradient to this L2 norm before the update (see
        /// [`OptimizerConfig::clip_norm`]). Default: no clipping.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        clip_norm: Option<f64>,
    },
    /// Adagrad, exactly as `torch.optim.Adagrad`:
    ///
    /// ```text
    /// g = grad + weight_decay * p
    /// clr = lr / (1 + (t - 1) * lr_decay)
    /// sum += g * g
    /// p -= clr * g / (sqrt(sum) + eps)
    /// ```
    ///
    /// State: one slot (`sum`), starting at `initial_accumulator_value`.
    Adagrad {
        /// Learning rate (required).
        lr: f64,
        /// Learning-rate decay per step. Default 0.
        #[serde(default)]
        lr_decay: f64,
        /// L2 penalty added to the gradient. Default 0.
        #[serde(default)]
        weight_decay: f64,
        /// Starting value of the squared-gradient accumulator. Default 0.
        #[serde(default)]
        initial_accumulator_value: f64,
        /// Term added to the denominator for numerical stability. Default 1e-10.
        #[serde(default = "default_adagrad_eps")]
        eps: f64,
        /// Clip each gradient to this L2 norm before the update (see
        /// [`OptimizerConfig::clip_norm`]). Default: no clipping.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        clip_norm: Option<f64>,
    },
    /// Adam, exactly as `torch.optim.Adam` (L2 weight decay is added to the gradient):
    ///
    /// ```text
    /// g = grad + weight_decay * p
    /// m = beta1 * m + (1 - beta1) * g
    /// v = beta2 * v + (1 - beta2) * g * g
    /// vmax = max(vmax, v)                                   (amsgrad only; then v := vmax)
    /// p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    /// ```
    ///
    /// State: slots `m`, `v` (and `vmax` with `amsgrad`), starting at 0.
    Adam {
        /// Learning rate (required).
        lr: f64,
        /// Decay of the first-moment estimate (PyTorch's `betas[0]`). Default 0.9.
        #[serde(default = "default_beta1")]
        beta1: f64,
        /// Decay of the second-moment estimate (PyTorch's `betas[1]`). Default 0.999.
        #[serde(default = "default_beta2")]
        beta2: f64,
        /// Term added to the denominator for numerical stability. Default 1e-8.
        #[serde(default = "default_adam_eps")]
        eps: f64,
        /// L2 penalty added to the gradient. Default 0.
        #[serde(default)]
        weight_decay: f64,
        /// Use the maximum of all second-moment estimates so far (AMSGrad). Default false.
        #[serde(default)]
        amsgrad: bool,
        /// Clip each gradient to this L2 norm before the update (see
        /// [`OptimizerConfig::clip_norm`]). Default: no clipping.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        clip_norm: Option<f64>,
    },
    /// AdamW, exactly as `torch.optim.AdamW`: Adam with decoupled weight decay, applied to the
    /// parameter before the Adam update (`p *= 1 - lr * weight_decay`) instead of to the
    /// gradient.
    ///
    /// State: slots `m`, `v` (and `vmax` with `amsgrad`), starting at 0.
    #[serde(rename = "adamw")]
    AdamW {
        /// Learning rate (required).
        lr: f64,
        /// Decay of the first-moment estimate (PyTorch's `betas[0]`). Default 0.9.
        #[serde(default = "default_beta1")]
        beta1: f64,
        /// Decay of the second-moment estimate (PyTorch's `betas[1]`). Default 0.999.
        #[serde(default = "default_beta2")]
        beta2: f64,
        /// Term added to the denominator for numerical stability. Default 1e-8.
        #[serde(default = "default_adam_eps")]
        eps: f64,
        /// Decoupled weight decay. Default 0.01.
        #[serde(default = "default_adamw_weight_decay")]
        weight_decay: f64,
        /// Use the maximum of all second-moment estimates so far (AMSGrad). Default false.
        #[serde(default)]
        amsgrad: bool,
        /// Clip each gradient to this L2 norm before the update (see
        /// [`OptimizerConfig::clip_norm`]). Default: no clipping.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        clip_norm: Option<f64>,
    },
    /// FTRL-Proximal (McMahan et al. 2013), as `tf.keras.optimizers.Ftrl` (TensorFlow's
    /// `ApplyFtrlV2` kernel), with accumulator `n` and linear term `z`:
    ///
    /// ```text
    /// g_s   = grad + 2 * l2_shrinkage * p
    /// n_new = n + grad * grad
    /// z    += g_s - (n_new^(-lr_power) - n^(-lr_power)) / lr * p
    /// q     = n_new^(-lr_power) / lr + 2 * (l2 + beta / (2 * lr))
    /// p     = (clamp(z, -l1, l1) - z) / q         (exactly 0 whenever |z| <= l1)
    /// n     = n_new
    /// ```
    ///
    /// With the default `lr_power = -0.5` the powers are square roots. Note TensorFlow's
    /// convention that `l2` enters the denominator doubled.
    ///
    /// State: slots `n` (starting at `initial_accumulator_value`) and `z` (starting at 0).
    Ftrl {
        /// Learning rate, the paper's alpha (required).
        lr: f64,
        /// Power of the accumulator in the per-coordinate learning rate; must be <= 0.
        /// Default -0.5.
        #[serde(default = "default_ftrl_lr_power")]
        lr_power: f64,
        /// Starting value of the accumulator `n`. Default 0.1.
        #[serde(default = "default_ftrl_initial_accumulator_value")]
        initial_accumulator_value: f64,
        /// L1 regularization strength; drives weights to exactly 0. Default 0.
        #[serde(default)]
        l1: f64,
        /// L2 regularization strength (TensorFlow convention). Default 0.
        #[serde(default)]
        l2: f64,
        /// L2 shrinkage regularization strength (magnitude penalty added to the gradient).
        /// Default 0.
        #[serde(default)]
        l2_shrinkage: f64,
        /// The paper's beta, added to the per-coordinate learning-rate denominator. Default 0.
        #[serde(default)]
        beta: f64,
        /// Clip each gradient to this L2 norm before the update (see
        /// [`OptimizerConfig::clip_norm`]). Default: no clipping.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        clip_norm: Option<f64>,
    },
}

fn default_adagrad_eps() -> f64 {
    1e-10
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_adam_eps() -> f64 {
    1e-8
}
fn default_adamw_weight_decay() -> f64 {
    0.01
}
fn default_ftrl_lr_power() -> f64 {
    -0.5
}
fn default_ftrl_initial_accumulator_value() -> f64 {
    0.1
}

/// Builds `InvalidOptimizer` errors that name the tensor, the field, its value and what was
/// expected.
struct Checker<'a> {
    tensor: &'a str,
    kind: &'static str,
}

impl Checker<'_> {
    fn fail(&self, message: String) -> CoreError {
        CoreError::InvalidOptimizer { tensor: self.tensor.to_string(), message }
    }

    fn check(&self, ok: bool, field: &str, value: f64, expected: &str) -> Result<(), CoreError> {
        if ok && value.is_finite() {
            Ok(())
        } else {
            Err(self.fail(format!("{} `{field}` is {value}, expected {expected}", self.kind)))
        }
    }

    fn positive(&self, field: &str, value: f64) -> Result<(), CoreError> {
        self.check(value > 0.0, field, value, "a finite number > 0")
    }

    fn non_negative(&self, field: &str, value: f64) -> Result<(), CoreError> {
        self.check(value >= 0.0, field, value, "a finite number >= 0")
    }

    fn beta(&self, field: &str, value: f64) -> Result<(), CoreError> {
        self.check((0.0..1.0).contains(&value), field, value, "a number in [0, 1)")
    }
}

impl OptimizerConfig {
    /// Plain SGD with learning rate `lr` and PyTorch's defaults for everything else.
    pub fn sgd(lr: f64) -> Self {
        OptimizerConfig::Sgd {
            lr,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            clip_norm: None,
        }
    }

    /// Adagrad with learning rate `lr` and PyTorch's defaults for everything else.
    pub fn adagrad(lr: f64) -> Self {
        OptimizerConfig::Adagrad {
            lr,
            lr_decay: 0.0,
            weight_decay: 0.0,
            initial_accumulator_value: 0.0,
            eps: default_adagrad_eps(),
            clip_norm: None,
        }
    }

    /// Adam with learning rate `lr` and PyTorch's defaults for everything else.
    pub fn adam(lr: f64) -> Self {
        OptimizerConfig::Adam {
            lr,
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_adam_eps(),
            weight_decay: 0.0,
            amsgrad: false,
            clip_norm: None,
        }
    }

    /// AdamW with learning rate `lr` and PyTorch's defaults (weight decay 0.01) for everything
    /// else.
    pub fn adamw(lr: f64) -> Self {
        OptimizerConfig::AdamW {
            lr,
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_adam_eps(),
            weight_decay: default_adamw_weight_decay(),
            amsgrad: false,
            clip_norm: None,
        }
    }

    /// FTRL-Proximal with learning rate `lr` and Keras's defaults for everything else.
    pub fn ftrl(lr: f64) -> Self {
        OptimizerConfig::Ftrl {
            lr,
            lr_power: default_ftrl_lr_power(),
            initial_accumulator_value: default_ftrl_initial_accumulator_value(),
            l1: 0.0,
            l2: 0.0,
            l2_shrinkage: 0.0,
            beta: 0.0,
            clip_norm: None,
        }
    }

    /// The `kind` name used in configs (`"sgd"`, `"adagrad"`, `"adam"`, `"adamw"`, `"ftrl"`).
    pub fn kind(&self) -> &'static str {
        match self {
            OptimizerConfig::Sgd { .. } => "sgd",
            OptimizerConfig::Adagrad { .. } => "adagrad",
            OptimizerConfig::Adam { .. } => "adam",
            OptimizerConfig::AdamW { .. } => "adamw",
            OptimizerConfig::Ftrl { .. } => "ftrl",
        }
    }

    /// Checks every hyperparameter; `tensor` names the tensor or table in the error.
    ///
    /// Refuses a learning rate that is not finite and positive, betas outside `[0, 1)`,
    /// `eps <= 0`, negative weight decay, momentum, accumulator values, `l1`, `l2` or `beta`,
    /// dampening outside `[0, 1]`, Nesterov without momentum or with dampening, `lr_power > 0`,
    /// a `clip_norm` that is not finite and positive, and an FTRL setting whose first update could divide 0 by 0.
    pub fn validate(&self, tensor: &str) -> Result<(), CoreError> {
        let c = Checker { tensor, kind: self.kind() };
        if let Some(clip_norm) = self.clip_norm() {
            c.positive("clip_norm", clip_norm)?;
        }
        match *self {
            OptimizerConfig::Sgd { lr, momentum, dampening, nesterov, weight_decay, .. } => {
                c.positive("lr", lr)?;
                c.non_negative("momentum", momentum)?;
                c.check((0.0..=1.0).contains(&dampening), "dampening", dampening, "a number in [0, 1]")?;
                c.non_negative("weight_decay", weight_decay)?;
                if nesterov && (momentum <= 0.0 || dampening != 0.0) {
                    return Err(c.fail(format!(
                        "sgd `nesterov` is true with `momentum` {momentum} and `dampening` \
                         {dampening}, expected momentum > 0 and dampening 0"
                    )));
                }
            }
            OptimizerConfig::Adagrad {
                lr, lr_decay, weight_decay, initial_accumulator_value, eps, ..
            } => {
                c.positive("lr", lr)?;
                c.non_negative("lr_decay", lr_decay)?;
                c.non_negative("weight_decay", weight_decay)?;
                c.non_negative("initial_accumulator_value", initial_accumulator_value)?;
                c.positive("eps", eps)?;
            }
            OptimizerConfig::Adam { lr, beta1, beta2, eps, weight_decay, amsgrad: _, .. }
            | OptimizerConfig::AdamW { lr, beta1, beta2, eps, weight_decay, amsgrad: _, .. } => {
                c.positive("lr", lr)?;
                c.beta("beta1", beta1)?;
                c.beta("beta2", beta2)?;
                c.positive("eps", eps)?;
                c.non_negative("weight_decay", weight_decay)?;
            }
            OptimizerConfig::Ftrl {
                lr,
                lr_power,
                initial_accumulator_value,
                l1,
                l2,
                l2_shrinkage,
                beta,
                ..
            } => {
                c.positive("lr", lr)?;
                c.check(lr_power <= 0.0, "lr_power", lr_power, "a finite number <= 0")?;
                c.non_negative("initial_accumulator_value", initial_accumulator_value)?;
                c.non_negative("l1", l1)?;
                c.non_negative("l2", l2)?;
                c.non_negative("l2_shrinkage", l2_shrinkage)?;
                c.non_negative("beta", beta)?;
                // With n = 0, a zero gradient and no l2/beta, the first update computes 0 / 0
                // and the weight becomes NaN for good; TensorFlow allows this, we do not.
                if initial_accumulator_value == 0.0 && lr_power != 0.0 && l2 == 0.0 && beta == 0.0 {
                    return Err(c.fail(
                        "ftrl `initial_accumulator_value` is 0 with `l2` 0 and `beta` 0, \
                         expected initial_accumulator_value > 0 (or l2 > 0 or beta > 0) so that \
                         a zero gradient cannot produce 0 / 0"
                            .to_string(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Per-element state arrays this optimizer keeps: SGD 1 with momentum else 0, Adagrad 1,
    /// Adam and AdamW 2 (3 with `amsgrad`), FTRL 2.
    pub fn num_slots(&self) -> usize {
        match *self {
            OptimizerConfig::Sgd { momentum, .. } => usize::from(momentum != 0.0),
            OptimizerConfig::Adagrad { .. } => 1,
            OptimizerConfig::Adam { amsgrad, .. } | OptimizerConfig::AdamW { amsgrad, .. } => {
                2 + usize::from(amsgrad)
            }
            OptimizerConfig::Ftrl { .. } => 2,
        }
    }

    /// Names of the state slots in slot order, e.g. for checkpoints and debugging output.
    pub fn slot_names(&self) -> &'static [&'static str] {
        match *self {
            OptimizerConfig::Sgd { momentum, .. } => {
                if momentum != 0.0 {
                    &["momentum_buffer"]
                } else {
                    &[]
                }
            }
            OptimizerConfig::Adagrad { .. } => &["sum"],
            OptimizerConfig::Adam { amsgrad, .. } | OptimizerConfig::AdamW { amsgrad, .. } => {
                if amsgrad {
                    &["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
                } else {
                    &["exp_avg", "exp_avg_sq"]
                }
            }
            OptimizerConfig::Ftrl { .. } => &["accumulator", "linear"],
        }
    }

    /// Sets the initial optimizer state; `state.len() == num_slots() * n`.
    ///
    /// The Adagrad accumulator and the FTRL accumulator `n` (slot 0 of both) start at
    /// `initial_accumulator_value`; everything else starts at 0.
    ///
    /// # Panics
    /// If `state.len()` is not a multiple of `num_slots()` (or not 0 when there are no slots).
    pub fn init_state(&self, state: &mut [f32]) {
        let slots = self.num_slots();
        if slots == 0 {
            assert!(
                state.is_empty(),
                "{} optimizer keeps no state, but init_state got {} floats",
                self.kind(),
                state.len()
            );
            return;
        }
        assert!(
            state.len().is_multiple_of(slots),
            "{} optimizer keeps {slots} state slots, but init_state got {} floats",
            self.kind(),
            state.len()
        );
        let n = state.len() / slots;
        let (first, rest) = state.split_at_mut(n);
        let first_value = match *self {
            OptimizerConfig::Adagrad { initial_accumulator_value, .. }
            | OptimizerConfig::Ftrl { initial_accumulator_value, .. } => initial_accumulator_value as f32,
            _ => 0.0,
        };
        first.fill(first_value);
        rest.fill(0.0);
    }

    /// One update in place. `state` is slot-major: slot `s` is `state[s*n..(s+1)*n]` with
    /// `n = param.len()`. `t` is the 1-based count of updates this tensor or row has had,
    /// including this one (1 on the first call).
    ///
    /// Does not allocate. Assumes the config passed [`OptimizerConfig::validate`].
    ///
    /// # Panics
    /// If `grad.len() != param.len()`, `state.len() != num_slots() * param.len()`, or `t == 0`:
    /// all caller bugs.
    pub fn step(&self, param: &mut [f32], grad: &[f32], state: &mut [f32], t: u64) {
        self.step_with(param, Grad::Plain(grad), state, t)
    }

    /// [`step`](Self::step) with a gradient that is computed as it is read (see [`Grad`]): the
    /// same result, bit for bit, as materializing `grad` first, without the extra pass.
    ///
    /// Applies neither `clip_norm` nor any check: see [`step_checked`](Self::step_checked).
    pub fn step_with(&self, param: &mut [f32], grad: Grad<'_>, state: &mut [f32], t: u64) {
        self.check_step_args(param, grad, state, t);
        let slots = split_slots(state, param.len());
        self.step_slots::<false>(param, grad, slots, t);
    }

    /// One update as [`step_with`](Self::step_with) does it, with the gradient first clipped
    /// to `clip_norm` (see [`clip_norm`](Self::clip_norm)), and checked for NaN and infinity:
    /// the update runs in blocks of [`CHECK_BLOCK`] elements (a slice of at most that many in
    /// one go), and its kernel notes, as it writes each new value and optimizer state, whether
    /// one is non-finite (an and, an add and an or per value, in the same vectorized loop; no
    /// pass of its own). The update stops after the first block with one, which is then
    /// searched, and the error says which element (and state slot) went bad and what it
    /// became: the first in the block's values, else in its first slot that has one.
    ///
    /// Nothing is put back: that block and those before it hold the update, the non-finite
    /// value included, and those after it are as they were. A caller that gets the error must
    /// treat the slice as lost, as a server does: it records the fault and from then on
    /// refuses every pull, push and checkpoint, so the values are never read again.
    ///
    /// # Panics
    /// As [`step`](Self::step).
    pub fn step_checked(
        &self,
        param: &mut [f32],
        grad: Grad<'_>,
        state: &mut [f32],
        t: u64,
    ) -> Result<(), NonFiniteUpdate> {
        self.check_step_args(param, grad, state, t);
        let n = param.len();
        let grad = self.clip(grad);
        let Some(start) = self.step_slots::<true>(param, grad, split_slots(state, n), t) else {
            return Ok(());
        };
        // The kernels saw a NaN or infinity in the block at `start`: find the first one.
        let end = (start + CHECK_BLOCK).min(n);
        let [a, b, c] = split_slots(state, n);
        let block_slots = [sub_ref(a, start, end), sub_ref(b, start, end), sub_ref(c, start, end)];
        let bad = self
            .check_block(&param[start..end], block_slots, end - start)
            .expect("the block the update found non-finite has a non-finite value");
        Err(NonFiniteUpdate { element: start + bad.element, ..bad })
    }

    /// The first NaN or infinity in `values`, else in `state`: up to three slices of state
    /// slots, slot-major, each a whole number of slots of `n` elements (one slice may hold all
    /// slots; unused ones are empty). Elements are numbered from the block's start.
    #[inline]
    fn check_block(&self, values: &[f32], state: [&[f32]; 3], n: usize) -> Option<NonFiniteUpdate> {
        if let Some(i) = first_non_finite(values) {
            return Some(NonFiniteUpdate { element: i, slot: None, value: values[i] });
        }
        // Where each slice starts in the slot-major state, counted in elements.
        let mut base = 0;
        for part in state {
            if let Some(i) = first_non_finite(part) {
                let at = base + i;
                return Some(NonFiniteUpdate {
                    element: at % n,
                    slot: Some(self.slot_names()[at / n]),
                    value: part[i],
                });
            }
            base += part.len();
        }
        None
    }

    /// One update as [`step_with`](Self::step_with) does it, with the gradient first clipped
    /// to `clip_norm` (see [`clip_norm`](Self::clip_norm)), and not checked.
    pub fn step_clipped(&self, param: &mut [f32], grad: Grad<'_>, state: &mut [f32], t: u64) {
        self.step_with(param, self.clip(grad), state, t)
    }

    /// The L2 norm a gradient is clipped to before each update, if any. The norm is that of
    /// the whole gradient handed to one update, computed in `f64` after averaging: on a
    /// server, one dense piece's averaged gradient (a tensor of at most `partition_bytes` is
    /// one piece, so its whole gradient) or one sparse row's. A gradient whose norm is over
    /// `clip_norm` is multiplied by `clip_norm / norm`; others are used as they are.
    pub fn clip_norm(&self) -> Option<f64> {
        match *self {
            OptimizerConfig::Sgd { clip_norm, .. }
            | OptimizerConfig::Adagrad { clip_norm, .. }
            | OptimizerConfig::Adam { clip_norm, .. }
            | OptimizerConfig::AdamW { clip_norm, .. }
            | OptimizerConfig::Ftrl { clip_norm, .. } => clip_norm,
        }
    }

    /// `grad` scaled down to `clip_norm`, where one is set and the norm is over it.
    #[inline]
    fn clip<'a>(&self, grad: Grad<'a>) -> Grad<'a> {
        let Some(max) = self.clip_norm() else { return grad };
        let norm = grad.norm();
        if !(norm > max) {
            return grad;
        }
        let factor = (max / norm) as f32;
        match grad {
            Grad::Plain(g) => Grad::Scaled(g, factor),
            Grad::Scaled(g, scale) => Grad::Scaled(g, (f64::from(scale) * max / norm) as f32),
            Grad::SumScaled(a, b, scale) => Grad::SumScaled(a, b, (f64::from(scale) * max / norm) as f32),
        }
    }

    fn check_step_args(&self, param: &[f32], grad: Grad<'_>, state: &[f32], t: u64) {
        let n = param.len();
        assert_eq!(
            grad.len(),
            n,
            "{} step: gradient has {} elements but the parameter has {n}",
            self.kind(),
            grad.len()
        );
        if let Grad::SumScaled(a, b, _) = grad {
            assert_eq!(a.len(), b.len(), "{} step: summed gradients differ in length", self.kind());
        }
        assert_eq!(
            state.len(),
            self.num_slots() * n,
            "{} step: state has {} floats, expected {} slots x {n} elements",
            self.kind(),
            state.len(),
            self.num_slots()
        );
        assert!(t >= 1, "{} step: t is the 1-based update count, got 0", self.kind());
    }

    /// The update of `param` with its state slots (unused ones empty). Checked (`CHECK`), it
    /// runs in blocks of [`CHECK_BLOCK`] elements, each kernel noting as it writes whether a
    /// new value or state is NaN or infinite (see [`carry`]); it stops after the first block
    /// with one and returns where that block starts. Unchecked, it is one pass over the whole
    /// slice and returns `None`.
    fn step_slots<const CHECK: bool>(
        &self,
        param: &mut [f32],
        grad: Grad<'_>,
        slots: [&mut [f32]; 3],
        t: u64,
    ) -> Option<usize> {
        match *self {
            OptimizerConfig::Sgd { lr, momentum, dampening, nesterov, weight_decay, .. } => {
                let lr = lr as f32;
                let wd = weight_decay as f32;
                if momentum == 0.0 {
                    return in_blocks::<CHECK>(param, grad, slots, |p, g, _| {
                        sgd_plain_step::<CHECK>(p, g, lr, wd)
                    });
                }
                let mu = momentum as f32;
                // PyTorch starts the buffer at the first gradient itself, undampened.
                let (keep, take) = if t == 1 { (0.0, 1.0) } else { (mu, (1.0 - dampening) as f32) };
                // Nesterov steps along g + mu * buf, plain momentum along buf.
                let (along_g, along_buf) = if nesterov { (1.0, mu) } else { (0.0, 1.0) };
                let k = SgdConsts { lr, wd, keep, take, along_g, along_buf };
                in_blocks::<CHECK>(param, grad, slots, |p, g, [s0, _, _]| {
                    sgd_momentum_step::<CHECK>(p, g, s0, &k)
                })
            }
            OptimizerConfig::Adagrad { lr, lr_decay, weight_decay, eps, .. } => {
                let clr = (lr / (1.0 + (t - 1) as f64 * lr_decay)) as f32;
                let (wd, eps) = (weight_decay as f32, eps as f32);
                in_blocks::<CHECK>(param, grad, slots, |p, g, [s0, _, _]| {
                    adagrad_step::<CHECK>(p, g, s0, clr, wd, eps)
                })
            }
            OptimizerConfig::Adam { lr, beta1, beta2, eps, weight_decay, amsgrad, .. } => {
                let k = AdamConsts::new(lr, beta1, beta2, eps, weight_decay, t);
                in_blocks::<CHECK>(param, grad, slots, |p, g, s| adam_step::<CHECK>(p, g, s, &k, amsgrad))
            }
            OptimizerConfig::AdamW { lr, beta1, beta2, eps, weight_decay, amsgrad, .. } => {
                let decay = (1.0 - lr * weight_decay) as f32;
                let k = AdamConsts::new(lr, beta1, beta2, eps, 0.0, t);
                in_blocks::<CHECK>(param, grad, slots, |p, g, s| {
                    if decay != 1.0 {
                        p.iter_mut().for_each(|p| *p *= decay);
                    }
                    adam_step::<CHECK>(p, g, s, &k, amsgrad)
                })
            }
            OptimizerConfig::Ftrl { lr, lr_power, l1, l2, l2_shrinkage, beta, .. } => {
                let k = FtrlConsts {
                    inv_lr: (1.0 / lr) as f32,
                    // TF folds beta into l2 as beta / (2 lr), and doubles l2 in the denominator.
                    two_l2: (2.0 * l2 + beta / lr) as f32,
                    two_shrinkage: (2.0 * l2_shrinkage) as f32,
                    l1: l1 as f32,
                };
                in_blocks::<CHECK>(param, grad, slots, |p, g, [s0, s1, _]| {
                    ftrl_step::<CHECK>(p, g, s0, s1, &k, lr_power)
                })
            }
        }
    }
}

/// Runs `update` (which returns an OR of [`carry`] over what it wrote) over the whole slice,
/// or, checked, over blocks of [`CHECK_BLOCK`] elements until one has a NaN or infinity, and
/// returns where that block starts.
#[inline(always)]
fn in_blocks<const CHECK: bool>(
    param: &mut [f32],
    grad: Grad<'_>,
    slots: [&mut [f32]; 3],
    mut update: impl FnMut(&mut [f32], Grad<'_>, [&mut [f32]; 3]) -> u32,
) -> Option<usize> {
    let n = param.len();
    if !CHECK || n <= CHECK_BLOCK {
        let carried = update(param, grad, slots);
        return (CHECK && non_finite_carried(carried)).then_some(0);
    }
    let [a, b, c] = slots;
    for start in (0..n).step_by(CHECK_BLOCK) {
        let end = (start + CHECK_BLOCK).min(n);
        let sub_slots = [sub(a, start, end), sub(b, start, end), sub(c, start, end)];
        if non_finite_carried(update(&mut param[start..end], grad.slice(start, end), sub_slots)) {
            return Some(start);
        }
    }
    None
}

/// What a kernel ORs over each value it writes, when checked: the bits without the sign plus
/// 2^23, which carries into the sign bit exactly where all exponent bits are set (NaN and
/// infinity). One and, one add and one or per value, no comparison and no branch, so the
/// kernel's loop vectorizes as before; see [`non_finite_carried`].
#[inline(always)]
fn carry(v: f32) -> u32 {
    (v.to_bits() & 0x7fff_ffff) + 0x0080_0000
}

/// Whether an OR of [`carry`] saw a NaN or infinity.
#[inline(always)]
fn non_finite_carried(carried: u32) -> bool {
    carried & 0x8000_0000 != 0
}

/// Elements an update is checked in (see [`OptimizerConfig::step_checked`]): 8 KiB of values
/// and as much of each state slot, which stay in the processor's first-level cache between
/// the update and the check.
pub const CHECK_BLOCK: usize = 2048;

/// An update that would have made a value or its optimizer state NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NonFiniteUpdate {
    /// The element (in the slice handed to the update) where it was found first.
    pub element: usize,
    /// The optimizer state slot it was in (see [`OptimizerConfig::slot_names`]); `None` for
    /// the value itself.
    pub slot: Option<&'static str>,
    /// The value the update computed there.
    pub value: f32,
}

impl std::fmt::Display for NonFiniteUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.slot {
            None => write!(f, "element {} would become {}", self.element, self.value),
            Some(slot) => {
                write!(f, "the optimizer's `{slot}` of element {} would become {}", self.element, self.value)
            }
        }
    }
}

/// `state` (slot-major over `n` elements) as its slots; those the optimizer lacks are empty.
fn split_slots(state: &mut [f32], n: usize) -> [&mut [f32]; 3] {
    let mut slots: [&mut [f32]; 3] = [&mut [], &mut [], &mut []];
    if n > 0 {
        for (slot, chunk) in slots.iter_mut().zip(state.chunks_exact_mut(n)) {
            *slot = chunk;
        }
    }
    slots
}

/// Elements `start..end` of a state slot; an unused (empty) slot stays empty.
fn sub(slot: &mut [f32], start: usize, end: usize) -> &mut [f32] {
    if slot.is_empty() { slot } else { &mut slot[start..end] }
}

/// [`sub`], read-only.
fn sub_ref(slot: &[f32], start: usize, end: usize) -> &[f32] {
    if slot.is_empty() { slot } else { &slot[start..end] }
}

/// The position of the first NaN or infinity in `x`. The common case, none, is found by a
/// scan without an early exit or a branch per element (an OR of [`carry`]), which the compiler
/// vectorizes; only where that finds one is the position looked for.
#[inline]
pub fn first_non_finite(x: &[f32]) -> Option<usize> {
    if non_finite_carried(x.iter().fold(0, |carried, &v| carried | carry(v))) {
        x.iter().position(|v| !v.is_finite())
    } else {
        None
    }
}

/// Binds `$g` to an iterator over the elements of `$grad` (a [`Grad`]) and evaluates `$body`,
/// once per form, so that each kernel is compiled for each form with a plain loop.
macro_rules! each_grad {
    ($grad:expr, $g:ident => $body:expr) => {
        match $grad {
            Grad::Plain(a) => {
                let $g = a.iter().copied();
                $body
            }
            Grad::Scaled(a, scale) => {
                let $g = a.iter().map(move |&x| x * scale);
                $body
            }
            Grad::SumScaled(a, b, scale) => {
                let $g = a.iter().zip(b).map(move |(&x, &y)| (x + y) * scale);
                $body
            }
        }
    };
}

/// The gradient of one step as the optimizer reads it, element by element.
///
/// A sync step's gradient is the mean of the workers' pushes. The update is bound by memory
/// traffic, not arithmetic, so computing that mean in a pass of its own (reading and writing
/// every element once more) costs about as much as a fifth of the update itself; here it is
/// computed as the kernel reads each element instead. Each form rounds exactly as the separate
/// passes would (one addition, then one multiplication, per element), so the results are bit
/// for bit those of materializing the gradient first.
#[derive(Debug, Clone, Copy)]
pub enum Grad<'a> {
    /// `g[i]`.
    Plain(&'a [f32]),
    /// `g[i] * scale`: a sum of pushes, averaged.
    Scaled(&'a [f32], f32),
    /// `(a[i] + b[i]) * scale`: two pushes summed and averaged, in that order.
    SumScaled(&'a [f32], &'a [f32], f32),
}

impl<'a> Grad<'a> {
    /// Elements in the gradient.
    pub fn len(&self) -> usize {
        match self {
            Grad::Plain(g) | Grad::Scaled(g, _) | Grad::SumScaled(g, _, _) => g.len(),
        }
    }

    /// Whether the gradient has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The gradient as a vector (for tests and references).
    pub fn to_vec(&self) -> Vec<f32> {
        each_grad!(*self, g => g.collect())
    }

    /// Elements `start..end` of the gradient, in the same form.
    pub fn slice(&self, start: usize, end: usize) -> Grad<'a> {
        match *self {
            Grad::Plain(g) => Grad::Plain(&g[start..end]),
            Grad::Scaled(g, scale) => Grad::Scaled(&g[start..end], scale),
            Grad::SumScaled(a, b, scale) => Grad::SumScaled(&a[start..end], &b[start..end], scale),
        }
    }

    /// The L2 norm of the gradient as read, summed in `f64` (so that it does not overflow
    /// where the `f32` elements are finite).
    pub fn norm(&self) -> f64 {
        each_grad!(*self, g => g.map(|x| f64::from(x) * f64::from(x)).sum::<f64>()).sqrt()
    }
}

/// The per-call constants of an SGD step with momentum.
struct SgdConsts {
    lr: f32,
    wd: f32,
    /// How much of the momentum buffer is kept, and how much of the gradient goes into it.
    keep: f32,
    take: f32,
    /// The step is `along_g * g + along_buf * buf`.
    along_g: f32,
    along_buf: f32,
}

// Each kernel returns, checked (`CHECK`), an OR of `carry` over every value and state it
// writes, else 0; the check adds no branch and no pass of its own.

#[inline(always)]
fn sgd_plain_step<const CHECK: bool>(param: &mut [f32], grad: Grad<'_>, lr: f32, wd: f32) -> u32 {
    each_grad!(grad, grad => sgd_plain::<CHECK>(param, grad, lr, wd))
}

#[inline(always)]
fn sgd_momentum_step<const CHECK: bool>(
    param: &mut [f32],
    grad: Grad<'_>,
    state: &mut [f32],
    k: &SgdConsts,
) -> u32 {
    each_grad!(grad, grad => sgd_momentum::<CHECK>(param, grad, state, k))
}

#[inline(always)]
fn sgd_plain<const CHECK: bool>(param: &mut [f32], grad: impl Iterator<Item = f32>, lr: f32, wd: f32) -> u32 {
    let mut carried = 0;
    for (p, g) in param.iter_mut().zip(grad) {
        let g = g + wd * *p;
        let new = *p - lr * g;
        *p = new;
        if CHECK {
            carried |= carry(new);
        }
    }
    carried
}

#[inline(always)]
fn sgd_momentum<const CHECK: bool>(
    param: &mut [f32],
    grad: impl Iterator<Item = f32>,
    state: &mut [f32],
    k: &SgdConsts,
) -> u32 {
    let mut carried = 0;
    for ((p, g), buf) in param.iter_mut().zip(grad).zip(state.iter_mut()) {
        let g = g + k.wd * *p;
        let b = k.keep * *buf + k.take * g;
        *buf = b;
        let new = *p - k.lr * (k.along_g * g + k.along_buf * b);
        *p = new;
        if CHECK {
            carried |= carry(new) | carry(b);
        }
    }
    carried
}

/// Runs `$body` compiled for AVX2 where the CPU has it (checked once, then cached), else for
/// the baseline: the build targets every x86-64, whose vectors are half as wide. Element-wise
/// `+ - * / sqrt` round the same either way (Rust never fuses a multiply and an add on its
/// own), so the results are bit for bit those of the baseline.
macro_rules! with_avx2 {
    ($name:ident, $body:ident($($arg:ident: $ty:ty),*)) => {
        fn $name<const CHECK: bool>($($arg: $ty),*) -> u32 {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn wide<const CHECK: bool>($($arg: $ty),*) -> u32 {
                    $body::<CHECK>($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2, checked just above.
                    return unsafe { wide::<CHECK>($($arg),*) };
                }
            }
            $body::<CHECK>($($arg),*)
        }
    };
}

with_avx2!(adagrad_step, adagrad_any(param: &mut [f32], grad: Grad<'_>, sum: &mut [f32], clr: f32, wd: f32, eps: f32));
with_avx2!(adam_step, adam_any(param: &mut [f32], grad: Grad<'_>, state: [&mut [f32]; 3], k: &AdamConsts, amsgrad: bool));

#[inline(always)]
fn adagrad_any<const CHECK: bool>(
    param: &mut [f32],
    grad: Grad<'_>,
    sum: &mut [f32],
    clr: f32,
    wd: f32,
    eps: f32,
) -> u32 {
    each_grad!(grad, grad => adagrad_kernel::<CHECK>(param, grad, sum, clr, wd, eps))
}

#[inline(always)]
fn adam_any<const CHECK: bool>(
    param: &mut [f32],
    grad: Grad<'_>,
    state: [&mut [f32]; 3],
    k: &AdamConsts,
    amsgrad: bool,
) -> u32 {
    each_grad!(grad, grad => adam_kernel::<CHECK>(param, grad, state, k, amsgrad))
}

#[inline(always)]
fn adagrad_kernel<const CHECK: bool>(
    param: &mut [f32],
    grad: impl Iterator<Item = f32>,
    sum: &mut [f32],
    clr: f32,
    wd: f32,
    eps: f32,
) -> u32 {
    let mut carried = 0;
    for ((p, g), s) in param.iter_mut().zip(grad).zip(sum.iter_mut()) {
        let g = g + wd * *p;
        let acc = *s + g * g;
        *s = acc;
        let new = *p - clr * g / (acc.sqrt() + eps);
        *p = new;
        if CHECK {
            carried |= carry(new) | carry(acc);
        }
    }
    carried
}

/// The per-call constants of an Adam step, computed once in `f64` outside the element loop.
struct AdamConsts {
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    /// `lr / (1 - beta1^t)`.
    step_size: f32,
    /// `1 / sqrt(1 - beta2^t)`.
    inv_bc2_sqrt: f32,
    eps: f32,
    weight_decay: f32,
}

impl AdamConsts {
    fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, t: u64) -> Self {
        // powi is several times cheaper than powf, which matters for short sparse rows.
        let pow = |b: f64| match i32::try_from(t) {
            Ok(t) => b.powi(t),
            Err(_) => b.powf(t as f64),
        };
        let bc1 = 1.0 - pow(beta1);
        let bc2 = 1.0 - pow(beta2);
        AdamConsts {
            beta1: beta1 as f32,
            beta2: beta2 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            step_size: (lr / bc1) as f32,
            inv_bc2_sqrt: (1.0 / bc2.sqrt()) as f32,
            eps: eps as f32,
            weight_decay: weight_decay as f32,
        }
    }
}

#[inline(always)]
fn adam_kernel<const CHECK: bool>(
    param: &mut [f32],
    grad: impl Iterator<Item = f32>,
    state: [&mut [f32]; 3],
    k: &AdamConsts,
    amsgrad: bool,
) -> u32 {
    let mut carried = 0;
    let [m, v, vmax] = state;
    // Separate loops rather than a branch per element, so that each one vectorizes.
    if amsgrad {
        for ((((p, g), m), v), vmax) in
            param.iter_mut().zip(grad).zip(m.iter_mut()).zip(v.iter_mut()).zip(vmax.iter_mut())
        {
            let g = g + k.weight_decay * *p;
            let mt = k.beta1 * *m + k.one_minus_beta1 * g;
            let vt = k.beta2 * *v + k.one_minus_beta2 * g * g;
            let vm = vmax.max(vt);
            *m = mt;
            *v = vt;
            *vmax = vm;
            let new = *p - k.step_size * mt / (vm.sqrt() * k.inv_bc2_sqrt + k.eps);
            *p = new;
            if CHECK {
                carried |= carry(new) | carry(mt) | carry(vt) | carry(vm);
            }
        }
    } else {
        for (((p, g), m), v) in param.iter_mut().zip(grad).zip(m.iter_mut()).zip(v.iter_mut()) {
            let g = g + k.weight_decay * *p;
            let mt = k.beta1 * *m + k.one_minus_beta1 * g;
            let vt = k.beta2 * *v + k.one_minus_beta2 * g * g;
            *m = mt;
            *v = vt;
            let new = *p - k.step_size * mt / (vt.sqrt() * k.inv_bc2_sqrt + k.eps);
            *p = new;
            if CHECK {
                carried |= carry(new) | carry(mt) | carry(vt);
            }
        }
    }
    carried
}

/// The per-call constants of an FTRL step.
struct FtrlConsts {
    inv_lr: f32,
    /// `2 * l2 + beta / lr`: the constant part of the denominator.
    two_l2: f32,
    two_shrinkage: f32,
    l1: f32,
}

with_avx2!(ftrl_step, ftrl_any(param: &mut [f32], grad: Grad<'_>, acc: &mut [f32], lin: &mut [f32], k: &FtrlConsts, lr_power: f64));

#[inline(always)]
fn ftrl_any<const CHECK: bool>(
    param: &mut [f32],
    grad: Grad<'_>,
    acc: &mut [f32],
    lin: &mut [f32],
    k: &FtrlConsts,
    lr_power: f64,
) -> u32 {
    if lr_power == -0.5 {
        // The default: powers are square roots, which vectorize where powf does not.
        each_grad!(grad, grad => ftrl_loop::<CHECK>(param, grad, acc, lin, k, f32::sqrt))
    } else {
        let e = (-lr_power) as f32;
        each_grad!(grad, grad => ftrl_loop::<CHECK>(param, grad, acc, lin, k, |x| x.powf(e)))
    }
}

#[inline(always)]
fn ftrl_loop<const CHECK: bool>(
    param: &mut [f32],
    grad: impl Iterator<Item = f32>,
    acc: &mut [f32],
    lin: &mut [f32],
    k: &FtrlConsts,
    pow: impl Fn(f32) -> f32,
) -> u32 {
    let mut carried = 0;
    for (((w, g), n), z) in param.iter_mut().zip(grad).zip(acc.iter_mut()).zip(lin.iter_mut()) {
        let g_shrunk = g + k.two_shrinkage * *w;
        let n_new = *n + g * g;
        let p_new = pow(n_new);
        let zt = *z + g_shrunk - (p_new - pow(*n)) * k.inv_lr * *w;
        let quadratic = p_new * k.inv_lr + k.two_l2;
        // clamp(z, -l1, l1) - z is exactly 0 when |z| <= l1: the L1 sparsity of FTRL.
        let new = (zt.max(-k.l1).min(k.l1) - zt) / quadratic;
        *w = new;
        *z = zt;
        *n = n_new;
        if CHECK {
            carried |= carry(new) | carry(zt) | carry(n_new);
        }
    }
    carried
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_wide_kernels_round_as_the_baseline_does() {
        // Odd lengths, so that the vector loops' tails run too; values over many magnitudes.
        let n = 1037;
        let val = |i: usize, salt: f32| (i as f32 * 0.7311 + salt).sin() * 10f32.powi((i % 9) as i32 - 4);
        let grad: Vec<f32> = (0..n).map(|i| val(i, 1.0)).collect();
        let param: Vec<f32> = (0..n).map(|i| val(i, 2.0)).collect();
        let (mut p1, mut p2) = (param.clone(), param.clone());
        let (mut s1, mut s2) = (vec![0.1f32; n], vec![0.1f32; n]);
        // The wide kernel checked, the baseline not: the check changes no rounding either.
        let carried = adagrad_step::<true>(&mut p1, Grad::Plain(&grad), &mut s1, 0.05, 0.01, 1e-10);
        assert!(!non_finite_carried(carried));
        adagrad_any::<false>(&mut p2, Grad::Plain(&grad), &mut s2, 0.05, 0.01, 1e-10);
        assert_eq!(
            (p1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), s1),
            (p2.iter().map(|v| v.to_bits()).collect(), s2)
        );
        for amsgrad in [false, true] {
            let k = AdamConsts::new(1e-3, 0.9, 0.999, 1e-8, 0.01, 7);
            let (mut p1, mut p2) = (param.clone(), param.clone());
            let (mut s1, mut s2) = (vec![0.01f32; 3 * n], vec![0.01f32; 3 * n]);
            let carried =
                adam_step::<true>(&mut p1, Grad::Plain(&grad), split_slots(&mut s1, n), &k, amsgrad);
            assert!(!non_finite_carried(carried));
            adam_any::<false>(&mut p2, Grad::Plain(&grad), split_slots(&mut s2, n), &k, amsgrad);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!((bits(&p1), bits(&s1)), (bits(&p2), bits(&s2)), "amsgrad {amsgrad}");
        }
        let k = FtrlConsts { inv_lr: 10.0, two_l2: 0.02, two_shrinkage: 0.01, l1: 1e-3 };
        for lr_power in [-0.5, -0.7] {
            let (mut p1, mut p2) = (param.clone(), param.clone());
            let (mut s1, mut s2) = (vec![0.1f32; 2 * n], vec![0.1f32; 2 * n]);
            let [a1, b1, _] = split_slots(&mut s1, n);
            let carried = ftrl_step::<true>(&mut p1, Grad::Plain(&grad), a1, b1, &k, lr_power);
            assert!(!non_finite_carried(carried));
            let [a2, b2, _] = split_slots(&mut s2, n);
            ftrl_any::<false>(&mut p2, Grad::Plain(&grad), a2, b2, &k, lr_power);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!((bits(&p1), bits(&s1)), (bits(&p2), bits(&s2)), "lr_power {lr_power}");
        }
    }

    #[test]
    fn a_gradient_computed_as_read_matches_the_one_materialized_first() {
        let n = 1037;
        let val = |i: usize, salt: f32| (i as f32 * 0.389 + salt).cos() * 10f32.powi((i % 7) as i32 - 3);
        let a: Vec<f32> = (0..n).map(|i| val(i, 0.5)).collect();
        let b: Vec<f32> = (0..n).map(|i| val(i, 1.5)).collect();
        let param: Vec<f32> = (0..n).map(|i| val(i, 2.5)).collect();
        let configs = [
            OptimizerConfig::sgd(0.1),
            tweak(OptimizerConfig::sgd(0.1), json!({"momentum": 0.9, "nesterov": true})),
            tweak(OptimizerConfig::adagrad(0.05), json!({"weight_decay": 0.01})),
            OptimizerConfig::adam(1e-3),
            tweak(OptimizerConfig::adam(1e-3), json!({"amsgrad": true})),
            OptimizerConfig::adamw(1e-3),
            OptimizerConfig::ftrl(0.1),
            tweak(OptimizerConfig::ftrl(0.1), json!({"lr_power": -0.6})),
        ];
        let scale = 1.0 / 3.0;
        let summed: Vec<f32> = a.iter().zip(&b).map(|(x, y)| (x + y) * scale).collect();
        let scaled: Vec<f32> = a.iter().map(|x| x * scale).collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for c in configs {
            for (grad, materialized) in [
                (Grad::SumScaled(&a, &b, scale), &summed),
                (Grad::Scaled(&a, scale), &scaled),
                (Grad::Plain(&a), &a),
            ] {
                assert_eq!(bits(&grad.to_vec()), bits(materialized));
                let mut state = vec![0f32; c.num_slots() * n];
                c.init_state(&mut state);
                let (mut p1, mut s1) = (param.clone(), state.clone());
                let (mut p2, mut s2) = (param.clone(), state);
                for t in 1..=3 {
                    c.step_with(&mut p1, grad, &mut s1, t);
                    c.step(&mut p2, materialized, &mut s2, t);
                }
                assert_eq!((bits(&p1), bits(&s1)), (bits(&p2), bits(&s2)), "{c:?} with {grad:?}");
                assert_ne!(bits(&p1), bits(&param), "{c:?} moved nothing");
            }
        }
    }

    #[test]
    fn a_checked_update_is_the_unchecked_one_where_all_stays_finite() {
        // A slice of several blocks and one updated in one go.
        for n in [2 * CHECK_BLOCK + 37, 37] {
            checked_is_unchecked(n);
        }
    }

    fn checked_is_unchecked(n: usize) {
        let val = |i: usize, salt: f32| (i as f32 * 0.389 + salt).cos();
        let a: Vec<f32> = (0..n).map(|i| val(i, 0.5)).collect();
        let b: Vec<f32> = (0..n).map(|i| val(i, 1.5)).collect();
        let param: Vec<f32> = (0..n).map(|i| val(i, 2.5)).collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for c in [
            OptimizerConfig::sgd(0.1),
            tweak(OptimizerConfig::sgd(0.1), json!({"momentum": 0.9})),
            OptimizerConfig::adagrad(0.05),
            tweak(OptimizerConfig::adam(1e-3), json!({"amsgrad": true})),
            OptimizerConfig::adamw(1e-3),
            OptimizerConfig::ftrl(0.1),
        ] {
            let mut state = vec![0f32; c.num_slots() * n];
            c.init_state(&mut state);
            let (mut p1, mut s1) = (param.clone(), state.clone());
            let (mut p2, mut s2) = (param.clone(), state);
            for t in 1..=3 {
                c.step_with(&mut p1, Grad::SumScaled(&a, &b, 0.5), &mut s1, t);
                c.step_checked(&mut p2, Grad::SumScaled(&a, &b, 0.5), &mut s2, t).unwrap();
            }
            assert_eq!((bits(&p1), bits(&s1)), (bits(&p2), bits(&s2)), "{c:?} over {n}");
        }
    }

    #[test]
    fn an_update_that_overflows_stops_at_its_block_and_is_named() {
        let n = 3 * CHECK_BLOCK + 5;
        let bad = 2 * CHECK_BLOCK + 7;
        // SGD: -3e38 - 1 * 3e38 is -inf in f32; every other element moves by 1.
        let c = OptimizerConfig::sgd(1.0);
        let mut param = vec![-3e38f32; n];
        let mut grad = vec![-1.0f32; n];
        grad[bad] = 3e38;
        let e = c.step_checked(&mut param, Grad::Plain(&grad), &mut [], 1).unwrap_err();
        assert_eq!((e.element, e.slot, e.value), (bad, None, f32::NEG_INFINITY));
        assert!(e.to_string().contains(&format!("element {bad} would become -inf")), "{e}");
        let stop = 3 * CHECK_BLOCK;
        assert!(param[..stop].iter().enumerate().all(|(i, &p)| i == bad || p == -3e38 + 1.0));
        assert!(param[stop..].iter().all(|&p| p == -3e38), "the update stops after the bad block");

        // Not in the first place of its block, nor in the first slot: a bad `v` of Adam found
        // after a good `m`, in a slice of one block and in one of several.
        let c = OptimizerConfig::adam(1e-3);
        for n in [40, CHECK_BLOCK + 40] {
            let bad = n - 3;
            let mut param = vec![0.5f32; n];
            let mut state = vec![0f32; 2 * n];
            let mut grad = vec![1.0f32; n];
            grad[bad] = 3e38; // (1 - beta2) g^2 overflows; m = (1 - beta1) g does not.
            let e = c.step_checked(&mut param, Grad::Plain(&grad), &mut state, 1).unwrap_err();
            assert_eq!((e.element, e.slot, e.value), (bad, Some("exp_avg_sq"), f32::INFINITY), "{n}");
        }

        // Adagrad: 3e38 squared overflows the accumulator, which is named, in any element.
        let c = OptimizerConfig::adagrad(0.05);
        for at in [0, 9, 16, 17] {
            let mut param = vec![0.5f32; 18];
            let mut state = vec![0f32; 18];
            let mut grad = [1.0f32; 18];
            grad[at] = 3e38;
            let e = c.step_checked(&mut param, Grad::Plain(&grad), &mut state, 1).unwrap_err();
            assert_eq!((e.element, e.slot, e.value), (at, Some("sum"), f32::INFINITY));
        }

        // A NaN in the values, wherever the scan's lanes put it, is found first and named.
        for n in [1, 15, 16, 17, 33, CHECK_BLOCK, CHECK_BLOCK + 1] {
            for at in [0, n / 2, n - 1] {
                let c = OptimizerConfig::sgd(1.0);
                let mut param = vec![1.0f32; n];
                let mut grad = vec![0.0f32; n];
                grad[at] = f32::NAN;
                let e = c.step_checked(&mut param, Grad::Plain(&grad), &mut [], 1).unwrap_err();
                assert_eq!((e.element, e.slot), (at, None), "{n} {at}");
                assert!(e.value.is_nan());
            }
        }
    }

    #[test]
    fn every_optimizer_names_a_nan_wherever_it_is() {
        for c in [
            OptimizerConfig::sgd(0.1),
            tweak(OptimizerConfig::sgd(0.1), json!({"momentum": 0.9, "nesterov": true})),
            OptimizerConfig::adagrad(0.05),
            OptimizerConfig::adam(1e-3),
            tweak(OptimizerConfig::adam(1e-3), json!({"amsgrad": true})),
            OptimizerConfig::adamw(1e-3),
            OptimizerConfig::ftrl(0.1),
            tweak(OptimizerConfig::ftrl(0.1), json!({"lr_power": -0.7})),
        ] {
            for n in [3, 40, 2 * CHECK_BLOCK + 40] {
                for at in [0, n / 2, n - 1] {
                    let mut param = vec![0.5f32; n];
                    let mut state = vec![0f32; c.num_slots() * n];
                    c.init_state(&mut state);
                    let mut grad = vec![0.25f32; n];
                    grad[at] = f32::NAN;
                    let e = c.step_checked(&mut param, Grad::Scaled(&grad, 0.5), &mut state, 1).unwrap_err();
                    assert_eq!((e.element, e.slot), (at, None), "{c:?} over {n} at {at}");
                    assert!(e.value.is_nan(), "{c:?}");
                }
            }
        }
    }

    #[test]
    fn first_non_finite_finds_the_first_in_any_lane() {
        for n in [0, 1, 7, 16, 31, 32, 100, 2048] {
            assert_eq!(first_non_finite(&vec![f32::MAX; n]), None);
            for at in 0..n {
                for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN] {
                    let mut x: Vec<f32> =
                        (0..n).map(|i| if i % 2 == 0 { f32::MAX } else { -1e-40 }).collect();
                    x[at] = bad;
                    if at + 1 < n {
                        x[n - 1] = f32::NAN;
                    }
                    assert_eq!(first_non_finite(&x), Some(at), "{n} {at} {bad}");
                }
            }
        }
    }

    #[test]
    fn clip_norm_scales_the_gradient_to_the_norm_as_an_independent_reference_does() {
        // Reference in f64: g * min(1, clip / |g|), then the plain update.
        let reference = |p: &[f32], g: &[f64], clip: f64, lr: f64| -> Vec<f64> {
            let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
            let k = if norm > clip { clip / norm } else { 1.0 };
            p.iter().zip(g).map(|(&p, &g)| f64::from(p) - lr * g * k).collect()
        };
        let close = |got: &[f32], want: &[f64]| {
            got.iter().zip(want).all(|(&a, &b)| (f64::from(a) - b).abs() <= 1e-6 * (1.0 + b.abs()))
        };
        let c = tweak(OptimizerConfig::sgd(0.5), json!({"clip_norm": 1.0}));
        c.validate("w").unwrap();
        assert_eq!(c.clip_norm(), Some(1.0));
        let a = [3.0f32, 4.0, 0.0, -12.0];
        let b = [1.0f32, 0.0, 2.0, 0.0];
        let param = [1.0f32, -1.0, 0.25, 2.0];
        let cases: [(Grad<'_>, Vec<f64>); 4] = [
            (Grad::Plain(&a), a.iter().map(|&x| f64::from(x)).collect()),
            (Grad::Scaled(&a, 0.5), a.iter().map(|&x| f64::from(x) * 0.5).collect()),
            (Grad::SumScaled(&a, &b, 0.5), a.iter().zip(&b).map(|(&x, &y)| f64::from(x + y) * 0.5).collect()),
            // Under the norm: used as it is.
            (Grad::Scaled(&a, 0.01), a.iter().map(|&x| f64::from(x) * 0.01).collect()),
        ];
        for (grad, g) in cases {
            let mut p = param;
            c.step_checked(&mut p, grad, &mut [], 1).unwrap();
            let want = reference(&param, &g, 1.0, 0.5);
            assert!(close(&p, &want), "{grad:?}: got {p:?}, want {want:?}");
        }
        // A gradient of 3e38 (its f32 square is infinite) is clipped to a finite step, and
        // Adagrad's accumulator stays finite.
        let c = tweak(OptimizerConfig::adagrad(0.05), json!({"clip_norm": 1.0}));
        let (mut p, mut sum) = ([0.5f32; 4], [0f32; 4]);
        c.step_checked(&mut p, Grad::Plain(&[3e38; 4]), &mut sum, 1).unwrap();
        // Each element of the clipped gradient is 1 / sqrt(4) = 0.5.
        assert!(sum.iter().all(|&s| (s - 0.25).abs() < 1e-5), "{sum:?}");
        assert!(p.iter().all(|&v| (v - (0.5 - 0.05)).abs() < 1e-5), "{p:?}");
        for bad in [0.0, -1.0] {
            let c = tweak(OptimizerConfig::adam(0.1), json!({"clip_norm": bad}));
            let e = c.validate("w").unwrap_err().to_string();
            assert!(e.contains("clip_norm"), "{e}");
        }
        // Without clip_norm the config's JSON is as before (checkpoints' specs compare equal).
        assert!(!serde_json::to_string(&OptimizerConfig::adam(0.1)).unwrap().contains("clip_norm"));
    }

    #[test]
    #[should_panic(expected = "summed gradients differ in length")]
    fn summed_gradients_of_different_lengths_panic() {
        let c = OptimizerConfig::sgd(0.1);
        c.step_with(&mut [0.0; 2], Grad::SumScaled(&[1.0; 2], &[1.0; 3], 0.5), &mut [], 1);
    }

    /// `base` with some hyperparameters replaced, the way a config file would override them.
    fn tweak(base: OptimizerConfig, patch: serde_json::Value) -> OptimizerConfig {
        let mut v = serde_json::to_value(base).unwrap();
        for (k, x) in patch.as_object().unwrap() {
            assert!(v.get(k).is_some() || k == "clip_norm", "no field {k}");
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    /// TensorFlow's FTRL-Proximal, transcribed literally in f64.
    #[allow(clippy::too_many_arguments)]
    fn ftrl_reference(
        w: &mut [f64],
        g: &[f64],
        n: &mut [f64],
        z: &mut [f64],
        lr: f64,
        lr_power: f64,
        l1: f64,
        l2: f64,
        l2_shrinkage: f64,
        beta: f64,
    ) {
        let l2_reg = l2 + beta / (2.0 * lr);
        for i in 0..w.len() {
            let grad_to_use = g[i] + 2.0 * l2_shrinkage * w[i];
            let new_accum = n[i] + g[i] * g[i];
            z[i] += grad_to_use - (new_accum.powf(-lr_power) - n[i].powf(-lr_power)) / lr * w[i];
            let quadratic = new_accum.powf(-lr_power) / lr + 2.0 * l2_reg;
            let clipped = z[i].clamp(-l1, l1);
            w[i] = (clipped - z[i]) / quadratic;
            n[i] = new_accum;
        }
    }

    fn pseudo_random(seed: u64, len: usize, scale: f64) -> Vec<f64> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    fn check_ftrl(config: OptimizerConfig) -> usize {
        config.validate("w").unwrap();
        let OptimizerConfig::Ftrl {
            lr, lr_power, initial_accumulator_value, l1, l2, l2_shrinkage, beta, ..
        } = config
        else {
            unreachable!()
        };
        let len = 37;
        let init = pseudo_random(1, len, 0.5);
        let mut w32: Vec<f32> = init.iter().map(|&x| x as f32).collect();
        let mut w64: Vec<f64> = w32.iter().map(|&x| x as f64).collect();
        let mut state = vec![f32::NAN; 2 * len];
        config.init_state(&mut state);
        let mut n64 = vec![initial_accumulator_value; len];
        let mut z64 = vec![0.0; len];
        let mut zeros = 0;
        for t in 1..=8u64 {
            let g64: Vec<f64> = pseudo_random(100 + t, len, 1.0).iter().map(|&x| (x as f32) as f64).collect();
            let g32: Vec<f32> = g64.iter().map(|&x| x as f32).collect();
            config.step(&mut w32, &g32, &mut state, t);
            ftrl_reference(&mut w64, &g64, &mut n64, &mut z64, lr, lr_power, l1, l2, l2_shrinkage, beta);
            for i in 0..len {
                let (a, b) = (w32[i] as f64, w64[i]);
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                    "step {t} element {i}: {a} vs reference {b} ({config:?})"
                );
                if b == 0.0 {
                    assert_eq!(w32[i], 0.0, "step {t} element {i} should be exactly 0");
                }
                let n = f64::from(state[i]);
                assert!(
                    (n - n64[i]).abs() <= 1e-6 * n64[i],
                    "accumulator {i} at step {t}: {n} vs {}",
                    n64[i]
                );
            }
            zeros = w32.iter().filter(|&&x| x == 0.0).count();
        }
        zeros
    }

    #[test]
    fn ftrl_matches_tensorflow_formula() {
        check_ftrl(OptimizerConfig::ftrl(0.1));
        let zeros = check_ftrl(OptimizerConfig::Ftrl {
            lr: 0.2,
            lr_power: -0.5,
            initial_accumulator_value: 0.1,
            l1: 0.5,
            l2: 0.01,
            l2_shrinkage: 0.0,
            beta: 0.0,
            clip_norm: None,
        });
        assert!(zeros > 0, "l1 = 0.5 should zero some weights");
        let zeros = check_ftrl(OptimizerConfig::Ftrl {
            lr: 0.05,
            lr_power: -0.3,
            initial_accumulator_value: 0.5,
            l1: 0.2,
            l2: 0.1,
            l2_shrinkage: 0.05,
            beta: 1.0,
            clip_norm: None,
        });
        assert!(zeros > 0, "l1 = 0.2 should zero some weights");
        check_ftrl(OptimizerConfig::Ftrl {
            lr: 0.05,
            lr_power: 0.0,
            initial_accumulator_value: 0.0,
            l1: 0.0,
            l2: 0.0,
            l2_shrinkage: 0.0,
            beta: 0.0,
            clip_norm: None,
        });
    }

    #[test]
    fn ftrl_l1_gives_exact_zeros_for_small_gradients() {
        let config = OptimizerConfig::Ftrl {
            lr: 0.1,
            lr_power: -0.5,
            initial_accumulator_value: 0.1,
            l1: 1.0,
            l2: 0.0,
            l2_shrinkage: 0.0,
            beta: 0.0,
            clip_norm: None,
        };
        let mut w = vec![0.3f32, -0.2, 0.0, 5.0];
        let mut state = vec![0.0; 8];
        config.init_state(&mut state);
        config.step(&mut w, &[0.01, -0.02, 0.5, 3.0], &mut state, 1);
        assert_eq!(&w[..3], &[0.0, 0.0, 0.0]);
        assert!(w[3] != 0.0);
    }

    /// torch.optim's update rules, transcribed literally in f64, for the options the PyTorch
    /// reference file does not exercise (dampening, lr_decay, Adagrad/Adam weight decay,
    /// amsgrad).
    fn torch_reference(c: &OptimizerConfig, p: &mut [f64], g: &[f64], s: &mut [Vec<f64>], t: u64) {
        let tf = t as f64;
        for i in 0..p.len() {
            match *c {
                OptimizerConfig::Sgd { lr, momentum, dampening, nesterov, weight_decay, .. } => {
                    let mut d = g[i] + weight_decay * p[i];
                    if momentum != 0.0 {
                        s[0][i] = if t == 1 { d } else { momentum * s[0][i] + (1.0 - dampening) * d };
                        d = if nesterov { d + momentum * s[0][i] } else { s[0][i] };
                    }
                    p[i] -= lr * d;
                }
                OptimizerConfig::Adagrad { lr, lr_decay, weight_decay, eps, .. } => {
                    let d = g[i] + weight_decay * p[i];
                    let clr = lr / (1.0 + (tf - 1.0) * lr_decay);
                    s[0][i] += d * d;
                    p[i] -= clr * d / (s[0][i].sqrt() + eps);
                }
                OptimizerConfig::Adam { lr, beta1, beta2, eps, weight_decay, amsgrad, .. }
                | OptimizerConfig::AdamW { lr, beta1, beta2, eps, weight_decay, amsgrad, .. } => {
                    let mut d = g[i];
                    if matches!(c, OptimizerConfig::AdamW { .. }) {
                        p[i] *= 1.0 - lr * weight_decay;
                    } else {
                        d += weight_decay * p[i];
                    }
                    s[0][i] = beta1 * s[0][i] + (1.0 - beta1) * d;
                    s[1][i] = beta2 * s[1][i] + (1.0 - beta2) * d * d;
                    let mut v = s[1][i];
                    if amsgrad {
                        s[2][i] = s[2][i].max(v);
                        v = s[2][i];
                    }
                    let step_size = lr / (1.0 - beta1.powf(tf));
                    let denom = v.sqrt() / (1.0 - beta2.powf(tf)).sqrt() + eps;
                    p[i] -= step_size * s[0][i] / denom;
                }
                OptimizerConfig::Ftrl { .. } => unreachable!(),
            }
        }
    }

    #[test]
    fn matches_torch_transcription_for_options_outside_the_reference_file() {
        let configs = [
            tweak(OptimizerConfig::sgd(0.05), json!({"momentum": 0.9, "dampening": 0.3})),
            tweak(OptimizerConfig::sgd(0.05), json!({"momentum": 0.5, "weight_decay": 0.1})),
            tweak(
                OptimizerConfig::adagrad(0.1),
                json!({"lr_decay": 0.05, "weight_decay": 0.02, "initial_accumulator_value": 0.3}),
            ),
            tweak(OptimizerConfig::adam(0.01), json!({"weight_decay": 0.05, "amsgrad": true})),
            tweak(OptimizerConfig::adamw(0.01), json!({"amsgrad": true, "beta2": 0.9})),
        ];
        let len = 29;
        for c in configs {
            c.validate("w").unwrap();
            let mut p32: Vec<f32> = pseudo_random(7, len, 1.0).iter().map(|&x| x as f32).collect();
            let mut p64: Vec<f64> = p32.iter().map(|&x| f64::from(x)).collect();
            let mut s32 = vec![0.0; c.num_slots() * len];
            c.init_state(&mut s32);
            let mut s64: Vec<Vec<f64>> =
                s32.chunks(len).map(|x| x.iter().map(|&v| f64::from(v)).collect()).collect();
            let mut max_err = 0.0f64;
            for t in 1..=20u64 {
                // Shrinking gradients, so that amsgrad's running max differs from v.
                let g32: Vec<f32> =
                    pseudo_random(50 + t, len, 2.0 / t as f64).iter().map(|&x| x as f32).collect();
                let g64: Vec<f64> = g32.iter().map(|&x| f64::from(x)).collect();
                c.step(&mut p32, &g32, &mut s32, t);
                torch_reference(&c, &mut p64, &g64, &mut s64, t);
                for (a, b) in p32.iter().zip(&p64) {
                    max_err = max_err.max((f64::from(*a) - b).abs() / b.abs().max(1.0));
                }
            }
            assert!(max_err <= 1e-6, "{c:?}: max error {max_err:e}");
        }
    }

    fn invalid(config: OptimizerConfig) -> String {
        match config.validate("layer1/w") {
            Err(CoreError::InvalidOptimizer { tensor, message }) => {
                assert_eq!(tensor, "layer1/w");
                message
            }
            other => panic!("{config:?} should be refused, got {other:?}"),
        }
    }

    #[test]
    fn validate_accepts_defaults() {
        for c in [
            OptimizerConfig::sgd(0.1),
            OptimizerConfig::adagrad(0.1),
            OptimizerConfig::adam(1e-3),
            OptimizerConfig::adamw(1e-3),
            OptimizerConfig::ftrl(0.05),
        ] {
            c.validate("w").unwrap();
        }
    }

    #[test]
    fn validate_refuses_bad_values_and_names_the_field() {
        for lr in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            for c in [
                OptimizerConfig::sgd(lr),
                OptimizerConfig::adagrad(lr),
                OptimizerConfig::adam(lr),
                OptimizerConfig::adamw(lr),
                OptimizerConfig::ftrl(lr),
            ] {
                let m = invalid(c);
                assert!(m.contains("`lr`") && m.contains("> 0"), "{m}");
            }
        }
        let m = invalid(tweak(OptimizerConfig::adam(0.1), json!({"beta1": 1.0})));
        assert!(m.contains("`beta1` is 1") && m.contains("[0, 1)"), "{m}");
        let m = invalid(tweak(OptimizerConfig::adamw(0.1), json!({"beta2": -0.1})));
        assert!(m.contains("`beta2` is -0.1"), "{m}");
        let m = invalid(tweak(OptimizerConfig::adam(0.1), json!({"eps": 0.0})));
        assert!(m.contains("`eps` is 0"), "{m}");
        let m = invalid(tweak(OptimizerConfig::adagrad(0.1), json!({"eps": -1e-10})));
        assert!(m.contains("`eps`"), "{m}");
        let m = invalid(tweak(OptimizerConfig::adamw(0.1), json!({"weight_decay": -0.01})));
        assert!(m.contains("`weight_decay` is -0.01") && m.contains(">= 0"), "{m}");
        let m = invalid(tweak(OptimizerConfig::sgd(0.1), json!({"momentum": -0.5})));
        assert!(m.contains("`momentum` is -0.5"), "{m}");
        let m = invalid(tweak(OptimizerConfig::sgd(0.1), json!({"dampening": 1.5})));
        assert!(m.contains("`dampening` is 1.5"), "{m}");
        let m = invalid(tweak(OptimizerConfig::sgd(0.1), json!({"nesterov": true})));
        assert!(m.contains("`nesterov`") && m.contains("momentum > 0"), "{m}");
        let m = invalid(tweak(
            OptimizerConfig::sgd(0.1),
            json!({"nesterov": true, "momentum": 0.9, "dampening": 0.1}),
        ));
        assert!(m.contains("`nesterov`") && m.contains("dampening 0"), "{m}");
        let m = invalid(tweak(OptimizerConfig::adagrad(0.1), json!({"initial_accumulator_value": -1.0})));
        assert!(m.contains("`initial_accumulator_value` is -1"), "{m}");
        let m = invalid(tweak(OptimizerConfig::adagrad(0.1), json!({"lr_decay": -1.0})));
        assert!(m.contains("`lr_decay`"), "{m}");
        let ftrl = OptimizerConfig::ftrl(0.1);
        let m = invalid(tweak(ftrl.clone(), json!({"lr_power": 0.5})));
        assert!(m.contains("`lr_power` is 0.5") && m.contains("<= 0"), "{m}");
        let m = invalid(tweak(ftrl.clone(), json!({"l1": -1.0})));
        assert!(m.contains("`l1` is -1"), "{m}");
        let m = invalid(OptimizerConfig::Ftrl {
            lr: 0.1,
            lr_power: -0.5,
            initial_accumulator_value: 0.1,
            l1: 0.0,
            l2: f64::NAN,
            l2_shrinkage: 0.0,
            beta: 0.0,
            clip_norm: None,
        });
        assert!(m.contains("`l2` is NaN"), "{m}");
        let m = invalid(tweak(ftrl.clone(), json!({"initial_accumulator_value": 0.0})));
        assert!(m.contains("`initial_accumulator_value` is 0"), "{m}");
        // ... which is fine once l2 keeps the denominator positive.
        tweak(ftrl, json!({"initial_accumulator_value": 0.0, "l2": 0.1})).validate("w").unwrap();
    }

    #[test]
    fn error_message_names_the_tensor() {
        let e = OptimizerConfig::sgd(-1.0).validate("emb/user").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("`emb/user`") && text.contains("sgd `lr` is -1"), "{text}");
    }

    #[test]
    fn defaults_follow_pytorch_and_keras() {
        let parse = |s: &str| serde_json::from_str::<OptimizerConfig>(s).unwrap();
        assert_eq!(parse(r#"{"kind": "sgd", "lr": 0.1}"#), OptimizerConfig::sgd(0.1));
        assert_eq!(
            OptimizerConfig::sgd(0.1),
            OptimizerConfig::Sgd {
                lr: 0.1,
                momentum: 0.0,
                dampening: 0.0,
                nesterov: false,
                weight_decay: 0.0,
                clip_norm: None,
            }
        );
        assert_eq!(parse(r#"{"kind": "adagrad", "lr": 0.1}"#), OptimizerConfig::adagrad(0.1));
        assert_eq!(
            OptimizerConfig::adagrad(0.1),
            OptimizerConfig::Adagrad {
                lr: 0.1,
                lr_decay: 0.0,
                weight_decay: 0.0,
                initial_accumulator_value: 0.0,
                eps: 1e-10,
                clip_norm: None,
            }
        );
        assert_eq!(parse(r#"{"kind": "adam", "lr": 0.1}"#), OptimizerConfig::adam(0.1));
        assert_eq!(
            OptimizerConfig::adam(0.1),
            OptimizerConfig::Adam {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
                amsgrad: false,
                clip_norm: None,
            }
        );
        assert_eq!(parse(r#"{"kind": "adamw", "lr": 0.1}"#), OptimizerConfig::adamw(0.1));
        assert_eq!(
            OptimizerConfig::adamw(0.1),
            OptimizerConfig::AdamW {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
                amsgrad: false,
                clip_norm: None,
            }
        );
        assert_eq!(parse(r#"{"kind": "ftrl", "lr": 0.1}"#), OptimizerConfig::ftrl(0.1));
        assert_eq!(
            OptimizerConfig::ftrl(0.1),
            OptimizerConfig::Ftrl {
                lr: 0.1,
                lr_power: -0.5,
                initial_accumulator_value: 0.1,
                l1: 0.0,
                l2: 0.0,
                l2_shrinkage: 0.0,
                beta: 0.0,
                clip_norm: None,
            }
        );
    }

    #[test]
    fn serde_round_trips_and_refuses_unknown_fields() {
        let configs = [
            OptimizerConfig::Sgd {
                lr: 0.3,
                momentum: 0.9,
                dampening: 0.0,
                nesterov: true,
                weight_decay: 1e-4,
                clip_norm: None,
            },
            OptimizerConfig::Adagrad {
                lr: 0.01,
                lr_decay: 1e-3,
                weight_decay: 0.1,
                initial_accumulator_value: 0.1,
                eps: 1e-7,
                clip_norm: None,
            },
            tweak(OptimizerConfig::adam(1e-3), json!({"amsgrad": true})),
            tweak(OptimizerConfig::adamw(1e-3), json!({"beta1": 0.8})),
            tweak(OptimizerConfig::ftrl(0.05), json!({"l1": 0.5, "beta": 1.0})),
        ];
        for c in configs {
            let json = serde_json::to_string(&c).unwrap();
            assert!(json.contains(&format!(r#""kind":"{}""#, c.kind())), "{json}");
            let back: OptimizerConfig = serde_json::from_str(&json).unwrap();
            assert_eq!(back, c, "{json}");
        }
        for bad in [
            r#"{"kind": "sgd", "lr": 0.1, "momentun": 0.9}"#,
            r#"{"kind": "adam", "lr": 0.1, "betas": [0.9, 0.99]}"#,
            r#"{"kind": "adamw", "lr": 0.1, "momentum": 0.9}"#,
            r#"{"kind": "ftrl", "lr": 0.1, "l1_regularization_strength": 0.1}"#,
            r#"{"kind": "rmsprop", "lr": 0.1}"#,
            r#"{"kind": "adam_w", "lr": 0.1}"#,
            r#"{"kind": "adam"}"#,
        ] {
            let err = serde_json::from_str::<OptimizerConfig>(bad);
            assert!(err.is_err(), "{bad} should be refused, got {err:?}");
        }
        let err = serde_json::from_str::<OptimizerConfig>(r#"{"kind": "sgd", "lr": 1, "momentun": 0.9}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("momentun"), "{err}");
    }

    #[test]
    fn slots_and_initial_state() {
        assert_eq!(OptimizerConfig::sgd(0.1).num_slots(), 0);
        assert_eq!(tweak(OptimizerConfig::sgd(0.1), json!({"momentum": 0.9})).num_slots(), 1);
        assert_eq!(OptimizerConfig::adagrad(0.1).num_slots(), 1);
        assert_eq!(OptimizerConfig::adam(0.1).num_slots(), 2);
        assert_eq!(tweak(OptimizerConfig::adam(0.1), json!({"amsgrad": true})).num_slots(), 3);
        assert_eq!(OptimizerConfig::adamw(0.1).num_slots(), 2);
        assert_eq!(tweak(OptimizerConfig::adamw(0.1), json!({"amsgrad": true})).num_slots(), 3);
        assert_eq!(OptimizerConfig::ftrl(0.1).num_slots(), 2);
        for c in [
            OptimizerConfig::sgd(0.1),
            OptimizerConfig::adam(0.1),
            tweak(OptimizerConfig::adam(0.1), json!({"amsgrad": true})),
            OptimizerConfig::ftrl(0.1),
        ] {
            assert_eq!(c.slot_names().len(), c.num_slots());
        }

        let mut s = vec![7.0; 3];
        tweak(OptimizerConfig::adagrad(0.1), json!({"initial_accumulator_value": 0.25})).init_state(&mut s);
        assert_eq!(s, [0.25; 3]);
        let mut s = vec![7.0; 6];
        OptimizerConfig::ftrl(0.1).init_state(&mut s);
        assert_eq!(s, [0.1, 0.1, 0.1, 0.0, 0.0, 0.0]);
        let mut s = vec![7.0; 9];
        tweak(OptimizerConfig::adam(0.1), json!({"amsgrad": true})).init_state(&mut s);
        assert_eq!(s, [0.0; 9]);
        OptimizerConfig::sgd(0.1).init_state(&mut []);
    }

    #[test]
    fn amsgrad_keeps_the_running_max() {
        let c = tweak(OptimizerConfig::adam(0.01), json!({"amsgrad": true}));
        let mut p = vec![1.0f32];
        let mut s = vec![0.0; 3];
        c.init_state(&mut s);
        c.step(&mut p, &[10.0], &mut s, 1);
        let v1 = s[1];
        assert_eq!(s[2], v1);
        c.step(&mut p, &[0.1], &mut s, 2);
        assert!(s[1] < v1, "the second moment decays after a small gradient: {s:?}");
        assert_eq!(s[2], v1, "the running max keeps the first, larger estimate");
    }

    #[test]
    fn zero_length_slices_are_fine() {
        for c in [OptimizerConfig::adam(0.1), OptimizerConfig::ftrl(0.1), OptimizerConfig::sgd(0.1)] {
            c.step(&mut [], &[], &mut [], 1);
        }
    }

    #[test]
    #[should_panic(expected = "gradient has 2 elements but the parameter has 3")]
    fn mismatched_gradient_panics() {
        OptimizerConfig::sgd(0.1).step(&mut [0.0; 3], &[0.0; 2], &mut [], 1);
    }

    #[test]
    #[should_panic(expected = "state has 3 floats, expected 2 slots x 3 elements")]
    fn mismatched_state_panics() {
        OptimizerConfig::adam(0.1).step(&mut [0.0; 3], &[0.0; 3], &mut [0.0; 3], 1);
    }

    #[test]
    #[should_panic(expected = "1-based")]
    fn step_zero_panics() {
        OptimizerConfig::adam(0.1).step(&mut [0.0; 1], &[0.0; 1], &mut [0.0; 2], 0);
    }
}
