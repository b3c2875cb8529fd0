"""The methods beyond a block split (Ditto, FedALA, ...): each update pinned against a hand computation
from the paper's equations on a tiny model (plain SGD, one full batch, so every step is one formula)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_store import ROOT, instruction
from torch import nn

from fedlayer.client import app as client_app
from fedlayer.client.recipes import CP_BANDWIDTHS, RECIPES, LocalTask, ala_weights, mmd_rbf, personalize
from fedlayer.client.store import join_state, split_state
from fedlayer.config import StrategyConfig, TrainConfig, load_config, to_toml
from fedlayer.experiment import federated_data, initial_model
from fedlayer.layers import resolve
from fedlayer.models import (
    MODEL_CLASSES,
    FeatureSplit,
    build_model,
    extend,
    global_view,
    head_module,
    hooks_of,
    model_groups,
)
from fedlayer.server.app import shared_layers
from strategies import ALGORITHMS, get_algorithm

N, D, C = 8, 3, 4  # samples, features, classes


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages are stamped with the running task's ids; outside a ClientApp we set them."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


LR = 0.5


def tiny(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D, C)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=gen), torch.randint(0, C, (N,), generator=gen)


def task_of(model: nn.Module, state: dict[str, torch.Tensor] | None = None, **strategy: object) -> LocalTask:
    """One full batch per epoch, no momentum: an epoch is one gradient step."""
    x, y = data()
    return LocalTask(
        model,
        x,
        y,
        TrainConfig(lr=LR, momentum=0.0, batch_size=N),
        StrategyConfig(**strategy),  # type: ignore[arg-type]
        torch.device("cpu"),
        torch.Generator().manual_seed(0),
        {"weight", "bias"},
        {"weight", "bias"},
        dict(state or {}),
    )


def ce_grads(w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """∇ of the mean cross-entropy of a linear model by hand: (softmax(xWᵀ + b) - onehot(y)) / N."""
    x, y = data()
    err = (torch.softmax(x @ w.T + b, dim=1) - nn.functional.one_hot(y, C).float()) / N
    return err.T @ x, err.sum(0)


def test_ditto_personal_step_is_sgd_on_ce_plus_the_proximal_pull() -> None:
    """v ← v - lr (∇CE(v) + mu (v - w)); then w ← w - lr ∇CE(w) (Li et al., 2021, Alg. 1)."""
    mu = 0.3
    w, v = tiny(0), tiny(1)
    task = task_of(w, {f"personal.{k}": t for k, t in v.state_dict().items()}, ditto_mu=mu)
    w0 = {k: t.detach().clone() for k, t in w.state_dict().items()}
    v0 = {k: t.detach().clone() for k, t in v.state_dict().items()}
    RECIPES["ditto"](task)
    gw, gb = ce_grads(v0["weight"], v0["bias"])
    personal = {k[len("personal.") :]: t for k, t in task.state.items()}
    torch.testing.assert_close(
        personal["weight"], v0["weight"] - LR * (gw + mu * (v0["weight"] - w0["weight"]))
    )
    torch.testing.assert_close(personal["bias"], v0["bias"] - LR * (gb + mu * (v0["bias"] - w0["bias"])))
    gw, gb = ce_grads(w0["weight"], w0["bias"])
    torch.testing.assert_close(w.weight.detach(), w0["weight"] - LR * gw)
    torch.testing.assert_close(w.bias.detach(), w0["bias"] - LR * gb)
    evaluated = personalize(ALGORITHMS["ditto"], task)
    torch.testing.assert_close(evaluated.weight.detach(), personal["weight"])


def test_ditto_starts_its_personal_model_from_the_received_one() -> None:
    w = tiny(0)
    task = task_of(w, ditto_mu=1.0)
    assert personalize(ALGORITHMS["ditto"], task) is w
    w0 = w.weight.detach().clone()
    RECIPES["ditto"](task)
    gw, _ = ce_grads(w0, tiny(0).bias.detach())
    torch.testing.assert_close(task.state["personal.weight"], w0 - LR * gw)  # the pull is 0 at v = w


def test_fedala_weight_update_and_clipping() -> None:
    """θ̂ = θ_l + (θ_g - θ_l) ⊙ W; W ← clip(W - η ∇_θ̂ L ⊙ (θ_g - θ_l), 0, 1) (Zhang et al., 2023, eq. 5)."""
    eta = 20.0  # large enough that some weights clip at 0 and at 1
    glob, local = tiny(0), tiny(1)
    task = task_of(glob, ala_eta=eta, ala_rand_percent=100, ala_layer_idx=2)
    g = {k: t.detach().clone() for k, t in glob.named_parameters()}
    loc = {k: t.detach().clone() for k, t in local.named_parameters()}
    w0 = {k: torch.full_like(t, 0.5) for k, t in g.items()}
    learned = ala_weights(task, loc, w0, until_converged=False)
    mixed = {k: loc[k] + (g[k] - loc[k]) * w0[k] for k in g}
    grads = dict(zip(("weight", "bias"), ce_grads(mixed["weight"], mixed["bias"]), strict=True))
    for k in g:
        expected = torch.clamp(w0[k] - eta * grads[k] * (g[k] - loc[k]), 0, 1)
        torch.testing.assert_close(learned[k], expected)
    flat = torch.cat([t.flatten() for t in learned.values()])
    assert (flat == 0).any() and (flat == 1).any(), "the test must exercise both clips"


def test_fedala_mixes_before_training_and_keeps_its_state() -> None:
    """Round > 1: the model trains from θ_l + (θ_g - θ_l) ⊙ W with the learned W; the lower tensors
    (outside ``ala_layer_idx``) stay global. Round 1 skips ALA."""
    glob, local = tiny(0), tiny(1)
    g = {k: t.detach().clone() for k, t in glob.named_parameters()}
    state = {f"local.{k}": t.detach().clone() for k, t in local.named_parameters() if k == "bias"}
    state |= {"ala_weights.bias": torch.full((C,), 0.5)}
    task = task_of(glob, state, ala_rand_percent=100, ala_layer_idx=1)  # only the bias is mixed
    learned = ala_weights(
        task_of(tiny(0), ala_rand_percent=100),
        {"bias": state["local.bias"]},
        {"bias": state["ala_weights.bias"]},
        until_converged=False,
    )
    RECIPES["fedala"](task)
    start_bias = state["local.bias"] + (g["bias"] - state["local.bias"]) * learned["bias"]
    gw, gb = ce_grads(g["weight"], start_bias)
    torch.testing.assert_close(glob.weight.detach(), g["weight"] - LR * gw)
    torch.testing.assert_close(glob.bias.detach(), start_bias - LR * gb)
    torch.testing.assert_close(task.state["ala_weights.bias"], learned["bias"])
    torch.testing.assert_close(task.state["local.bias"], glob.bias.detach())
    first = task_of(tiny(0), ala_layer_idx=1)
    RECIPES["fedala"](first)
    assert set(first.state) == {"local.bias"}, "round one: no weights learned yet"


def test_fedala_start_phase_trains_weights_until_the_losses_settle() -> None:
    glob, local = tiny(0), tiny(1)
    task = task_of(glob, ala_rand_percent=100)
    loc = {k: t.detach().clone() for k, t in local.named_parameters()}
    ones = {k: torch.ones_like(t) for k, t in loc.items()}
    once = ala_weights(task, loc, ones, until_converged=False)
    settled = ala_weights(task, loc, ones, until_converged=True)
    assert any(not torch.equal(once[k], settled[k]) for k in loc), "more than one epoch in the start phase"


def test_client_state_is_saved_under_its_own_prefix() -> None:
    personal, state = {"fc2.weight": torch.ones(2)}, {"personal.conv1.weight": torch.zeros(3)}
    saved = join_state(personal, state)
    assert set(saved) == {"fc2.weight", "state.personal.conv1.weight"}
    back_personal, back_state = split_state(saved)
    assert set(back_personal) == set(personal) and set(back_state) == set(state)


@pytest.mark.parametrize("name", ["ditto", "fedala"])
def test_stateful_methods_declare_their_state(name: str) -> None:
    assert ALGORITHMS[name].state


class TwoLayer(nn.Module):
    """The smallest model with head / body groups: fc1 (body), fc2 (head)."""

    HEAD_BLOCKS = ("fc2",)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(D, 5), nn.Linear(5, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_fedrod_balanced_softmax_and_personal_head_steps() -> None:
    """Generic head: SGD on CE(g + log n_y'); personal head: SGD on CE(g.detach() + p(z.detach()))
    (Chen & Chao, 2022, eq. 4-5); the body gets the balanced loss's gradient only."""
    model = rod_head_model()
    x, y = data()
    counts = torch.bincount(y, minlength=C).float()
    linear = nn.functional.linear  # calling model.fc2 would run the extension's hook (g + p)
    z = torch.relu(model.fc1(x)).detach()
    g = linear(z, model.fc2.weight, model.fc2.bias).detach()
    p = linear(z, model.rod_head.weight, model.rod_head.bias).detach()
    before = {k: t.detach().clone() for k, t in model.state_dict().items()}
    body = copy.deepcopy(model.fc1)
    bsm = nn.functional.cross_entropy(
        linear(torch.relu(body(x)), model.fc2.weight, model.fc2.bias) + counts.log(), y
    )
    grads = torch.autograd.grad(bsm, list(body.parameters()))
    RECIPES["fedrod"](task_of(model))
    onehot = nn.functional.one_hot(y, C).float()
    err_g = (torch.softmax(g + counts.log(), dim=1) - onehot) / N
    err_p = (torch.softmax(g + p, dim=1) - onehot) / N
    torch.testing.assert_close(model.fc2.weight.detach(), before["fc2.weight"] - LR * err_g.T @ z)
    torch.testing.assert_close(model.fc2.bias.detach(), before["fc2.bias"] - LR * err_g.sum(0))
    torch.testing.assert_close(model.rod_head.weight.detach(), before["rod_head.weight"] - LR * err_p.T @ z)
    torch.testing.assert_close(model.rod_head.bias.detach(), before["rod_head.bias"] - LR * err_p.sum(0))
    torch.testing.assert_close(model.fc1.weight.detach(), before["fc1.weight"] - LR * grads[0])


def rod_head_model() -> nn.Module:
    return extend(TwoLayer(), "rod_head", StrategyConfig(name="fedrod"))


@pytest.mark.parametrize("name", list(MODEL_CLASSES))
def test_rod_head_extends_every_model_with_head_and_body_groups(name: str) -> None:
    model = extend(build_model(name, 10, 1, 28), "rod_head", StrategyConfig(name="fedrod"))
    head = model_groups(model)["head"]
    assert head[-1] == "rod_head" and len(head) == 2
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    personalized = model(x)
    generic = global_view(copy.deepcopy(model))(x)
    personal_head = model.rod_head
    features = {}
    head_module(model).register_forward_hook(lambda m, i, o: features.setdefault("z", i[0]))
    model(x)
    torch.testing.assert_close(personalized, generic + personal_head(features["z"]))
    cfg = StrategyConfig(name="fedrod")
    resolution = resolve(get_algorithm(cfg).selector(cfg), model)
    assert set(resolution.personal_keys) == {"rod_head.weight", "rod_head.bias"}


def test_feddbe_step_with_personal_bias_and_mean_regularizer() -> None:
    """Head input z + c; r = m · mean(z) after the reset; loss CE + λ mean(½ (r - ḡ)²) (Zhang et al., 2023,
    eq. 6-8 with PFLlib's running mean)."""
    m, lam = 0.1, 5.0
    model = extend(TwoLayer(), "dbe", StrategyConfig(name="feddbe"))
    c, glob = torch.linspace(-0.5, 0.5, 5), torch.linspace(1.0, 2.0, 5)
    with torch.no_grad():
        model.dbe_bias.client_mean.copy_(c)
    x, y = data()
    w1, b1 = (
        model.fc1.weight.detach().clone().requires_grad_(),
        model.fc1.bias.detach().clone().requires_grad_(),
    )
    w2, b2 = model.fc2.weight.detach().clone(), model.fc2.bias.detach().clone()
    z = torch.relu(x @ w1.T + b1)
    hand = nn.functional.cross_entropy((z + c) @ w2.T + b2, y) + lam * torch.mean(
        0.5 * (m * z.mean(0) - glob) ** 2
    )
    g_w1, _ = torch.autograd.grad(hand, [w1, b1])
    z = z.detach()
    err = (torch.softmax((z + c) @ w2.T + b2, dim=1) - nn.functional.one_hot(y, C).float()) / N
    task = task_of(model, {"dbe_global.mean": glob}, dbe_momentum=m, dbe_kl_weight=lam)
    RECIPES["feddbe"](task)
    torch.testing.assert_close(model.fc2.weight.detach(), w2 - LR * err.T @ (z + c))
    torch.testing.assert_close(model.dbe_bias.client_mean.detach(), c - LR * err.sum(0) @ w2)
    torch.testing.assert_close(model.fc1.weight.detach(), w1.detach() - LR * g_w1)
    torch.testing.assert_close(model.dbe_mean.running_mean, m * z.mean(0))
    assert int(model.dbe_mean.num_batches_tracked) == 1


def test_feddbe_keeps_the_first_global_mean_and_waits_for_it() -> None:
    model = extend(TwoLayer(), "dbe", StrategyConfig(name="feddbe"))
    task = task_of(model, dbe_kl_weight=1.0)
    RECIPES["feddbe"](task)
    assert not task.state and not model.dbe_bias.client_mean.detach().any(), "no global mean yet: no DBE"
    received = model.dbe_mean.running_mean.clone()  # as if the server's average came back
    RECIPES["feddbe"](task)
    torch.testing.assert_close(task.state["dbe_global.mean"], received)
    assert model.dbe_bias.client_mean.detach().any()
    assert global_view(copy.deepcopy(model))(data()[0]).shape == (N, C)


@pytest.mark.parametrize("name", list(MODEL_CLASSES))
def test_dbe_extends_every_model_with_head_and_body_groups(name: str) -> None:
    model = extend(build_model(name, 10, 1, 28), "dbe", StrategyConfig(name="feddbe"))
    with torch.no_grad():
        model.dbe_bias.client_mean.fill_(0.25)
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    assert not torch.allclose(model(x), global_view(copy.deepcopy(model))(x))
    cfg = StrategyConfig(name="feddbe")
    resolution = resolve(get_algorithm(cfg).selector(cfg), model)
    assert set(resolution.personal_keys) == {"dbe_bias.client_mean"}
    assert {"dbe_mean.running_mean", "dbe_mean.num_batches_tracked"} <= set(resolution.shared_keys)


def cp_model() -> nn.Module:
    """TwoLayer + FedCP's extension; its personal head unlike the global one, its LayerNorm no identity."""
    model = extend(TwoLayer(), "cp", StrategyConfig(name="fedcp"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in ("cp_head.weight", "cp_head.bias", "cp_policy.norm.weight", "cp_policy.norm.bias"):
            param = model.get_parameter(name)
            param.add_(torch.randn(param.shape, generator=gen))
    return model


def layer_norm(v: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    mean = v.mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(((v - mean) ** 2).mean(-1, keepdim=True) + 1e-5) * gamma + beta


def mmd_of_pairs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MMD² by explicit differences: mean over (i, j) of k(x_i, x_j) + k(y_i, y_j) - 2 k(x_i, y_j)."""

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        squared = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return sum(torch.exp(-squared / (2 * s)) for s in (10, 15, 20, 50))  # type: ignore[return-value]

    return (k(x, x) + k(y, y) - 2 * k(x, y)).mean()


def test_fedcp_steps_with_policy_masks_mmd_and_the_head_merge() -> None:
    """Two full-batch steps, by the paper's equations (Zhang et al., 2023, eq. 3-9, PFLlib's clientCP):
    c = normalize(Σ_rows W_p) fixed for the round; s = ReLU(LN(A (z ⊙ c) + a)) as two rows of logits;
    (pm, gm) = softmax(s + Gumbel) over the rows; logits = h_p(z ⊙ pm) + h_g(z ⊙ gm); loss CE + λ MMD(z, z₀)
    with z₀ the received body's features; h_g frozen, then h_g ← ½ h_p + ½ h_g. The noise is the task
    generator's, drawn after each epoch's batch order (so the second step's MMD is not zero: z ≠ z₀)."""
    lam, d = 2.0, 5
    model = cp_model()
    x, y = data()
    names = ["fc1.weight", "fc1.bias", "cp_head.weight", "cp_head.bias"]
    names += [f"cp_policy.{m}.{t}" for m in ("linear", "norm") for t in ("weight", "bias")]
    start = {k: t.detach().clone() for k, t in model.state_dict().items()}

    def hand(weight: float) -> dict[str, torch.Tensor]:
        p = {k: start[k].clone().requires_grad_() for k in names}
        c = nn.functional.normalize(start["cp_head.weight"].sum(0), dim=0)
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            order = torch.randperm(N, generator=gen)
            noise = -torch.empty(N, 2, d).exponential_(generator=gen).log()
            xb, yb = x[order], y[order]
            z = torch.relu(xb @ p["fc1.weight"].T + p["fc1.bias"])
            z0 = torch.relu(xb @ start["fc1.weight"].T + start["fc1.bias"])
            s = (z * c) @ p["cp_policy.linear.weight"].T + p["cp_policy.linear.bias"]
            s = torch.relu(layer_norm(s, p["cp_policy.norm.weight"], p["cp_policy.norm.bias"]))
            masks = torch.softmax(s.view(N, 2, d) + noise, dim=1)
            pm, gm = masks[:, 0], masks[:, 1]
            logits = (z * pm) @ p["cp_head.weight"].T + p["cp_head.bias"]
            logits = logits + (z * gm) @ start["fc2.weight"].T + start["fc2.bias"]
            loss = nn.functional.cross_entropy(logits, yb) + weight * mmd_of_pairs(z, z0)
            grads = torch.autograd.grad(loss, [p[k] for k in names])
            p = {k: (p[k] - LR * g).detach().requires_grad_() for k, g in zip(names, grads, strict=True)}
        return {k: t.detach() for k, t in p.items()}

    task = task_of(model, cp_lambda=lam)
    task.train = TrainConfig(lr=LR, momentum=0.0, batch_size=N, epochs=2)
    RECIPES["fedcp"](task)
    expected = hand(lam)
    for k in names:
        torch.testing.assert_close(model.get_parameter(k).detach(), expected[k], msg=k)
    for k in ("weight", "bias"):
        merged = 0.5 * expected[f"cp_head.{k}"] + 0.5 * start[f"fc2.{k}"]
        torch.testing.assert_close(model.get_parameter(f"fc2.{k}").detach(), merged)
    assert not torch.allclose(hand(0.0)["fc1.weight"], expected["fc1.weight"]), "the MMD term must count"


def test_mmd_matches_the_pairwise_definition_in_fp32_under_autocast() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 4, generator=gen) * 3, torch.randn(6, 4, generator=gen) * 3 + 1
    expected = mmd_of_pairs(x.double(), y.double()).float()
    assert CP_BANDWIDTHS == (10.0, 15.0, 20.0, 50.0)
    torch.testing.assert_close(mmd_rbf(x, y), expected)
    torch.testing.assert_close(mmd_rbf(x, x), torch.tensor(0.0), atol=1e-6, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(mmd_rbf(x, y), expected)


def test_fedcp_noise_comes_from_the_task_generator_and_evaluation_has_none() -> None:
    """Training is reproducible and leaves torch's global RNG alone; evaluation masks are noise-free (a
    deterministic function of the weights, as the barrier identities need)."""
    a, b = cp_model(), cp_model()
    rng = torch.get_rng_state()
    RECIPES["fedcp"](task_of(a))
    RECIPES["fedcp"](task_of(b))
    assert torch.equal(torch.get_rng_state(), rng)
    for k, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[k]), k
    x = data()[0]
    split = next(h for h in hooks_of(a) if isinstance(h, FeatureSplit))
    assert split.generator is None and split.context is None, "the round's settings end with the round"
    assert torch.equal(a(x), a(x))
    split.generator = torch.Generator().manual_seed(0)
    assert not torch.equal(a(x), a(x)), "with a generator set the masks are noisy"


@pytest.mark.parametrize("name", list(MODEL_CLASSES))
def test_cp_extends_every_model_and_keeps_only_the_personal_head(name: str) -> None:
    model = extend(build_model(name, 10, 1, 28), "cp", StrategyConfig(name="fedcp"))
    head = head_module(model)
    assert model_groups(model)["head"][-1] == "cp_head"
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    features = {}
    head.register_forward_pre_hook(lambda m, i: features.update(z=i[0]))  # returns None: input unchanged
    out = model(x)
    z = features["z"]
    with torch.no_grad():
        c = nn.functional.normalize(model.cp_head.weight.sum(0), dim=0)
        logits = model.cp_policy(z * c)
        pm, gm = torch.softmax(logits, dim=1).unbind(1)
        expected = model.cp_head(z * pm) + nn.functional.linear(z * gm, head.weight, head.bias)
        torch.testing.assert_close(out, expected)
        generic = global_view(copy.deepcopy(model))(x)
        torch.testing.assert_close(generic, nn.functional.linear(z, head.weight, head.bias))
    cfg = StrategyConfig(name="fedcp")
    resolution = resolve(get_algorithm(cfg).selector(cfg), model)
    assert set(resolution.personal_keys) == {"cp_head.weight", "cp_head.bias"}
    policy = {f"cp_policy.{m}.{t}" for m in ("linear", "norm") for t in ("weight", "bias")}
    head_keys = {k for k in model.state_dict() if k.startswith(model_groups(model)["head"][0] + ".")}
    assert policy | head_keys <= set(resolution.shared_keys)


def test_cp_copies_work_on_their_own_modules() -> None:
    """A deep copy's hook uses the copy's personal head and policy, and functional_call's weights (the
    analysis evaluates client states through one template); global_view of a copy leaves the original."""
    model = cp_model().eval()
    x = data()[0]
    before = model(x).detach()
    twin = copy.deepcopy(model)
    split = next(h for h in hooks_of(twin) if isinstance(h, FeatureSplit))
    assert split.personal_head is twin.cp_head and split.policy is twin.cp_policy
    with torch.no_grad():
        twin.cp_head.weight.add_(1.0)
    assert not torch.allclose(twin(x), before)
    torch.testing.assert_close(model(x), before)
    state = {k: v.clone() for k, v in twin.state_dict().items()}
    torch.testing.assert_close(torch.func.functional_call(model, state, (x,)), twin(x))
    global_view(twin)
    assert not split.active and all(h.active for h in hooks_of(model))
    torch.testing.assert_close(twin(x), twin.fc2.forward(torch.relu(twin.fc1(x))))  # h_g(z) alone


def test_fedcp_client_uploads_the_merged_global_head(tiny_fmnist: Path, tmp_path: Path) -> None:
    """The real ClientApp: what goes up is the global head ½ h_p + ½ h_g (h_g frozen in training, h_p as
    trained and kept on the node), never the personal head."""
    cfg = load_config(
        ROOT / "experiments/default.toml",
        [
            f"data.root='{tiny_fmnist}'",
            "data.min_partition_size=5",
            "federation.clients=2",
            "strategy.name='fedcp'",
        ],
    )
    model = initial_model(cfg, federated_data(cfg).test, "cp")
    keys = shared_layers(cfg, model).shared_keys
    shared = ArrayRecord({k: v for k, v in model.state_dict().items() if k in keys})
    node = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "node")}
    trained = client_app.train(
        instruction(MessageType.TRAIN, to_toml(cfg), shared, 1), Context(7, 1, node, RecordDict(), {})
    )
    sent = trained.content.array_records["arrays"].to_torch_state_dict()
    assert not any(k.startswith("cp_head.") for k in sent)
    kept = torch.load(tmp_path / "node" / "run-7" / "partition-0" / "round-000001.pt", weights_only=True)
    received = model.state_dict()
    for k in ("weight", "bias"):
        merged = 0.5 * kept[f"cp_head.{k}"] + 0.5 * received[f"fc2.{k}"]
        torch.testing.assert_close(sent[f"fc2.{k}"], merged)
    assert not torch.equal(kept["cp_head.weight"], received["cp_head.weight"]), "h_p trained"


@pytest.mark.parametrize("name", ["ditto", "fedala", "fedrod", "feddbe", "fedcp", "gpfl"])
def test_the_client_app_restores_client_state_and_extensions_after_a_restart(
    name: str, tiny_fmnist: Path, tmp_path: Path
) -> None:
    """The real ClientApp functions: train in round 1, then evaluate with a fresh Context (a restarted
    SuperNode): the personalized model comes back from the node's store, client state included."""
    cfg = load_config(
        ROOT / "experiments/default.toml",
        [
            f"data.root='{tiny_fmnist}'",
            "data.min_partition_size=5",
            "federation.clients=2",
            f"strategy.name='{name}'",
        ],
    )
    text = to_toml(cfg)
    model = initial_model(cfg, federated_data(cfg).test, ALGORITHMS[name].extension)
    keys = shared_layers(cfg, model).shared_keys
    shared = ArrayRecord({k: v for k, v in model.state_dict().items() if k in keys})
    node = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "node")}

    def context() -> Context:
        return Context(7, 1, dict(node), RecordDict(), {})

    trained = client_app.train(instruction(MessageType.TRAIN, text, shared, 1), context())
    after = float(trained.content["metrics"]["personalized_acc_after"])  # type: ignore[arg-type, index]
    sent = trained.content.array_records["arrays"]
    assert list(sent.keys()) == keys, "only the shared keys travel"
    reply = client_app.evaluate_personalized(instruction(MessageType.EVALUATE, text, sent, 1), context())
    assert float(reply.content["metrics"]["personalized_acc"]) == after  # type: ignore[arg-type, index]
    saved = torch.load(tmp_path / "node" / "run-7" / "partition-0" / "round-000001.pt", weights_only=True)
    declared = {k.split(".")[1] for k in saved if k.startswith("state.")}
    assert declared <= set(ALGORITHMS[name].state)


def gpfl_model() -> nn.Module:
    return extend(TwoLayer(), "gpfl", StrategyConfig(name="gpfl"))


def test_gpfl_step_with_valve_category_embedding_pull_and_decay() -> None:
    """z_c = ReLU(z ⊙ (1 + γ(c)) + β(c)), γ(c) = LN(ReLU(W_γ c + b_γ)) (β alike); loss
    CE(head(z_p), y) + CE(cos(z_g, E), y) + λ ‖z_g - E₀[y]‖_F; E and the valve decay by μ (Zhang et al., 2023,
    eq. 3-9 as PFLlib's clientGPFL.train: lines 63-85)."""
    lam, mu = 0.7, 0.2
    model = gpfl_model()
    p_in, g_in = torch.linspace(-1.0, 1.0, 5), torch.linspace(0.5, -0.5, 5)
    with torch.no_grad():
        model.gpfl_inputs.personal.copy_(p_in)
        model.gpfl_inputs.generic.copy_(g_in)
    x, y = data()
    b = {k: t.detach().clone().requires_grad_() for k, t in model.named_parameters()}
    z = torch.relu(x @ b["fc1.weight"].T + b["fc1.bias"])

    def valve(c: torch.Tensor) -> torch.Tensor:
        def branch(name: str) -> torch.Tensor:
            h = torch.relu(b[f"gpfl_cov.{name}.0.weight"] @ c + b[f"gpfl_cov.{name}.0.bias"])
            return layer_norm(h, b[f"gpfl_cov.{name}.2.weight"], b[f"gpfl_cov.{name}.2.bias"])

        return torch.relu(z * (1 + branch("gamma")) + branch("beta"))

    z_p, z_g = valve(p_in), valve(g_in)
    emb = b["gpfl_gce.weight"]
    cosine = (z_g / z_g.norm(dim=1, keepdim=True)) @ (emb / emb.norm(dim=1, keepdim=True)).T
    onehot = nn.functional.one_hot(y, C).float()
    category = -(onehot * torch.log_softmax(cosine, dim=1)).sum(1).mean()
    logits = z_p @ b["fc2.weight"].T + b["fc2.bias"]
    ce = -(onehot * torch.log_softmax(logits, dim=1)).sum(1).mean()
    pull = torch.sqrt(((z_g - emb.detach()[y]) ** 2).sum())
    hand = ce + category + lam * pull
    names = list(b)
    grads = dict(zip(names, torch.autograd.grad(hand, [b[k] for k in names]), strict=True))
    err = (torch.softmax(logits, dim=1) - onehot).detach() / N
    torch.testing.assert_close(grads["fc2.weight"], err.T @ z_p.detach())  # the head sees z_p only
    RECIPES["gpfl"](task_of(model, gpfl_lambda=lam, gpfl_mu=mu))
    after = model.state_dict()
    for k in names:
        decay = mu * b[k].detach() if k.startswith(("gpfl_gce.", "gpfl_cov.")) else 0.0
        torch.testing.assert_close(after[k], b[k].detach() - LR * (grads[k] + decay), msg=k)


def test_gpfl_conditional_inputs_after_training_and_zero_before() -> None:
    """PFLlib's set_GCE (lines 101-108): generic = Σ_c E_c / C, personal = Σ_c E_c · n_c / n, from the
    client's trained embedding; both zero until the first training."""
    model = gpfl_model()
    assert not model.gpfl_inputs.generic.any() and not model.gpfl_inputs.personal.any()
    task = task_of(model)
    RECIPES["gpfl"](task)
    emb = model.gpfl_gce.weight.detach()
    counts = [int((task.y == c).sum()) for c in range(C)]
    personal = sum(emb[c] * counts[c] / N for c in range(C))
    generic = sum(emb[c] / C for c in range(C))
    torch.testing.assert_close(model.gpfl_inputs.personal, personal)
    torch.testing.assert_close(model.gpfl_inputs.generic, generic)
    assert not torch.equal(emb, tiny_gce()), "the embedding trained before the inputs were taken"


def tiny_gce() -> torch.Tensor:
    return gpfl_model().gpfl_gce.weight.detach()


@pytest.mark.parametrize("name", list(MODEL_CLASSES))
def test_gpfl_extends_every_model_and_shares_body_embedding_and_valve(name: str) -> None:
    """Shared: the model's body, the category embedding and the valve; personal: the head and the
    conditional inputs. Personalized: head(CoV(z, p)); the global view: cos(CoV(z, mean E), E)."""
    model = extend(build_model(name, 10, 1, 28), "gpfl", StrategyConfig(name="gpfl"))
    cfg = StrategyConfig(name="gpfl")
    resolution = resolve(get_algorithm(cfg).selector(cfg), model)
    head = model_groups(model)["head"]
    assert head == list(type(model).HEAD_BLOCKS)  # type: ignore[attr-defined]
    inputs = {"gpfl_inputs.generic", "gpfl_inputs.personal"}
    assert set(resolution.personal_keys) == {f"{head[0]}.weight", f"{head[0]}.bias"} | inputs
    assert {"gpfl_gce.weight", "gpfl_cov.gamma.0.weight", "gpfl_cov.beta.2.bias"} <= set(
        resolution.shared_keys
    )
    with torch.no_grad():
        model.gpfl_inputs.personal.normal_()
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    features = {}
    head_module(model).register_forward_pre_hook(lambda m, i: features.setdefault("z", i[0]), prepend=True)
    personalized = model(x)
    z, emb = features["z"], model.gpfl_gce.weight
    torch.testing.assert_close(
        personalized, head_module(model).forward(model.gpfl_cov(z, model.gpfl_inputs.personal))
    )
    glob = global_view(copy.deepcopy(model))
    conditioned = nn.functional.normalize(model.gpfl_cov(z, emb.mean(0)))
    torch.testing.assert_close(glob(x), conditioned @ nn.functional.normalize(emb).T)
    with torch.no_grad():
        glob.gpfl_cov.gamma[0].weight.zero_()  # the copy's hooks use the copy's modules
    torch.testing.assert_close(model(x), personalized)
