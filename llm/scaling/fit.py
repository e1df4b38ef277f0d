"""The loss as a function of parameters N and training tokens D: L(N, D) = E + A / N^alpha + B / D^beta, fitted as
Hoffmann et al. (2022, "Chinchilla", approach 3) and OLMo's ladder do: the Huber loss (delta 1e-3) of the log
residuals, log L_hat - log L with log L_hat = logsumexp(a - alpha log N, b - beta log D, e) (A = e^a, B = e^b,
E = e^e; alpha and beta through a sigmoid, so that they stay in (0, MAX_EXPONENT): a handful of small runs
otherwise lets an exponent run off to where a term vanishes), minimised with L-BFGS from a grid of
starting points, the best kept. Plain torch in float64."""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import torch

from llm.errors import ConfigError

MAX_EXPONENT = 1.5  # published fits: alpha, beta 0.07-0.5


def _logit(exponent: float) -> float:
    return math.log(exponent / (MAX_EXPONENT - exponent))


@dataclass
class Law:
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    huber: float = 0.0  # the objective at the fit (mean Huber loss of the log residuals)

    def predict(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def to_dict(self) -> dict:
        return asdict(self)


def _huber(r: torch.Tensor, delta: float) -> torch.Tensor:
    a = r.abs()
    return torch.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def _objective(theta: torch.Tensor, log_n, log_d, log_l, delta: float) -> torch.Tensor:
    a, b, e, x_alpha, x_beta = theta
    alpha, beta = MAX_EXPONENT * torch.sigmoid(x_alpha), MAX_EXPONENT * torch.sigmoid(x_beta)
    pred = torch.logsumexp(torch.stack([a - alpha * log_n, b - beta * log_d, e.expand_as(log_n)]), dim=0)
    return _huber(pred - log_l, delta).mean()


def fit_law(n: list[float], d: list[float], loss: list[float], delta: float = 1e-3, grid: dict | None = None) -> Law:
    """The L(N, D) that minimises the Huber loss of the log residuals over the points (n_i, d_i, loss_i); at least
    five points (five constants), every value positive."""
    if not (len(n) == len(d) == len(loss)) or len(n) < 5:
        raise ConfigError(f"a fit of L(N, D) needs at least 5 runs (5 constants); got {len(loss)}")
    if min(min(n), min(d), min(loss)) <= 0:
        raise ConfigError("every run's params, tokens and val_loss must be positive to fit L(N, D)")
    log_n, log_d, log_l = (torch.tensor([math.log(x) for x in v], dtype=torch.float64) for v in (n, d, loss))
    grid = grid or {
        "a": [0.0, 5.0, 15.0],
        "b": [0.0, 5.0, 15.0],
        "e": [-1.0, 0.5],
        "alpha": [0.2, 0.6],
        "beta": [0.2, 0.6],
    }
    best, best_value = None, math.inf
    for start in itertools.product(*grid.values()):
        a, b, e, alpha, beta = start
        theta = torch.tensor([a, b, e, _logit(alpha), _logit(beta)], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS(
            [theta], max_iter=100, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
        )

        def closure(opt=opt, theta=theta):
            opt.zero_grad()
            value = _objective(theta, log_n, log_d, log_l, delta)
            value.backward()
            return value

        try:
            opt.step(closure)
        except RuntimeError:  # a start that leaves the finite region
            continue
        with torch.no_grad():
            value = _objective(theta, log_n, log_d, log_l, delta).item()
        if math.isfinite(value) and value < best_value:
            best, best_value = theta.detach().clone(), value
    if best is None:
        raise ConfigError("the L(N, D) fit did not converge from any starting point")
    a, b, e, x_alpha, x_beta = best.tolist()
    alpha, beta = (MAX_EXPONENT / (1 + math.exp(-x)) for x in (x_alpha, x_beta))
    return Law(E=math.exp(e), A=math.exp(a), alpha=alpha, B=math.exp(b), beta=beta, huber=best_value)
