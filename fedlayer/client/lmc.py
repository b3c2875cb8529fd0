"""``lmc``'s client side: in a decision round, the cost of sharing each block, measured on the client's
own data.

The server side (the decision rule, the policy, its log) is :mod:`strategies.lmc`; the maths is
:func:`fedlayer.analysis.sharing.sharing_costs`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import ArrayRecord

from fedlayer.analysis.sharing import cost_sample, sharing_costs
from fedlayer.contract import COST_PREFIX
from fedlayer.experiment import cost_generator
from fedlayer.models import model_blocks

if TYPE_CHECKING:
    from fedlayer.client.app import ClientJob


def cost_metrics(job: ClientJob, reference: ArrayRecord | None) -> dict[str, float]:
    """``lmc.<block>`` -> the cost of sharing that block, for the train reply's metrics.

    Costs are measured toward the incoming global blocks and, when the server sent one, its reference for
    the personal ones, on a seeded sample of the local training data. Blocks without a server value are not
    measured.
    """
    server = job.incoming | (reference.to_torch_state_dict() if reference is not None else {})
    generator = cost_generator(job.cfg, job.partition_id, job.server_round)
    sample = cost_sample(job.train_data.x, job.train_data.y, job.cfg.strategy.lmc_samples, generator)
    blocks = {b: keys for b, keys in model_blocks(job.model).items() if set(keys) <= server.keys()}
    alpha = job.cfg.strategy.lmc_alpha
    costs = sharing_costs(job.model, server, blocks, sample, device=job.device, alpha=alpha)
    return {COST_PREFIX + block: cost for block, cost in costs.items()}
