"""Secure aggregation (Flower's SecAgg+) as both ends of a MoMA-FL federation run it.

With ``secagg = "secaggplus"`` a round's train exchange is Flower's SecAgg+ protocol (Bell et
al., CCS 2020): four messages per site (setup, share keys, collect masked vectors, unmask) in
which each site sends its update quantised and masked (a private mask plus pairwise masks
shared with its neighbours, the masks' seeds secret-shared among the neighbours), so that the
coordinator learns only the (weighted) sum of the updates of the sites that completed the
round, and that sum only if at least ``threshold`` of each site's neighbours answer the last
stage. What travels as the "parameters" is the site's *change* of the global student
(:func:`update_arrays`, one float32 array per sent tensor, in :func:`tensor_order`), multiplied
by the site's weight (its example count over ``max-weight``; 1 under client-level DP).

This module holds what both ends must agree on, besides Flower's protocol:

- :func:`secure_mask_generator` replaces Flower's ``pseudo_rand_gen``, which folds each 32-byte
  key into a 32-bit seed of numpy's Mersenne Twister: a coordinator holding a site's private
  mask (it reconstructs it in every round) could strip a 32-bit pairwise mask by trying every
  seed. The masks here are AES-256-CTR streams keyed with SHA-256 of the whole key
  (``cryptography``). :func:`install_secure_masks` puts it into Flower's SecAgg+ modules
  (:data:`MASK_MODULES`, by :mod:`moma_protocol.flwr_compat`), on both ends (a site and a
  coordinator that disagree produce no usable sum, never a leak).
- The site's own checks on what the coordinator asks (:func:`check_setup`,
  :func:`check_unmask`): a reconstruction threshold above half of the shares (so that no
  coordinator can collect both the private-mask share and the key share of one site), and
  an unmask request that names no site both alive and dropped.
- :func:`check_secagg_reply`: what a site's reply to a SecAgg+ stage may carry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from moma_protocol.flwr_compat import MASK_MODULES as MASK_MODULES  # the swapped modules
from moma_protocol.flwr_compat import RECORD_KEY_CONFIGS, Key, Stage

CONFIGS = RECORD_KEY_CONFIGS
#: what a site's reply may hold, per stage: its config keys (Flower's protocol values: public
#: keys, encrypted shares, masked vectors, shares), and for the masked-vector stage the legacy
#: fit result's records (metrics and weight; the parameters record is emptied by the protocol)
STAGE_REPLY_KEYS: dict[str, frozenset[str]] = {
    Stage.SETUP: frozenset({Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2}),
    Stage.SHARE_KEYS: frozenset({Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST}),
    Stage.COLLECT_MASKED_VECTORS: frozenset({Key.MASKED_PARAMETERS}),
    Stage.UNMASK: frozenset({Key.NODE_ID_LIST, Key.SHARE_LIST}),
}
FIT_RECORDS = frozenset({"fitres.metrics", "fitres.num_examples", "fitres.parameters",
                         "fitres.status"})
#: what Flower's workflow reads from a masked-vector reply besides the masked vector
FIT_REQUIRED = frozenset({"fitres.metrics", "fitres.num_examples", "fitres.status"})


def is_secagg(content: RecordDict) -> bool:
    """Whether a train message is a stage of the SecAgg+ protocol."""
    return CONFIGS in content.config_records


def stage_of(content: RecordDict) -> str:
    return str(content.config_records[CONFIGS].get(Key.STAGE, ""))


# -- the masks ---------------------------------------------------------------------------------
def secure_mask_generator(seed: bytes, num_range: int,
                          dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Masks in ``[0, num_range)`` for arrays of ``dimensions_list``: one AES-256-CTR stream
    keyed with SHA-256(``seed``) (Flower's ``pseudo_rand_gen`` signature and output type)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if num_range < 2 or num_range & (num_range - 1) or num_range > 1 << 62:
        raise ValueError(f"mask range {num_range}: a power of two up to 2**62")
    counts = [int(np.prod(d)) if len(d) else 1 for d in dimensions_list]
    key = hashlib.sha256(bytes(seed)).digest()
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    raw = stream.update(bytes(8 * sum(counts))) + stream.finalize()
    words = np.frombuffer(raw, dtype=np.uint64) & np.uint64(num_range - 1)
    out, start = [], 0
    for dims, n in zip(dimensions_list, counts, strict=True):
        arr = words[start:start + n].astype(np.int64)
        out.append(arr.reshape(dims) if len(dims) else np.array(arr[0], dtype=np.int64))
        start += n
    return out


def install_secure_masks() -> None:
    """Use :func:`secure_mask_generator` in Flower's SecAgg+ modules (idempotent; the swap
    itself: :func:`moma_protocol.flwr_compat.install_mask_generator`)."""
    from moma_protocol.flwr_compat import install_mask_generator

    install_mask_generator(secure_mask_generator)


# -- the update as the protocol's "parameters" -------------------------------------------------
def tensor_order(keys: Iterable[str]) -> list[str]:
    """The order of the tensors in the protocol's list of arrays (both ends)."""
    return sorted(keys)


def update_arrays(sent: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray]
                  ) -> list[np.ndarray]:
    """The site's change ``sent − start`` (float32), one array per sent tensor, in order."""
    missing = [k for k in sent if k not in start]
    if missing:
        raise ValueError(f"the update names tensors the global student lacks: {missing[:3]}")
    return [np.asarray(sent[k], dtype=np.float32) - np.asarray(start[k], dtype=np.float32)
            for k in tensor_order(sent)]


def expected_shapes(reference: Mapping[str, Sequence[int]], keys: Iterable[str]
                    ) -> list[tuple[int, ...]]:
    """The masked vector's array shapes for ``keys``: the weight factor, then the tensors."""
    return [(1,)] + [tuple(reference[k]) for k in tensor_order(keys)]


# -- the site's checks -------------------------------------------------------------------------
def check_setup(configs: ConfigRecord) -> str | None:
    """Why a site refuses the coordinator's setup, or None: the threshold must exceed half of
    the shares (else a coordinator could gather, from different neighbours, both the share of
    a site's private mask and the share of its key, and unmask that site alone)."""
    try:
        shares, threshold = int(configs[Key.SHARE_NUMBER]), int(configs[Key.THRESHOLD])
        samples = int(configs[Key.SAMPLE_NUMBER])
    except (KeyError, TypeError, ValueError):
        return "the secure-aggregation setup is incomplete"
    if samples < 2 or shares < 2:
        return "secure aggregation needs at least two sites"
    if not 2 * threshold > shares:
        return (f"reconstruction threshold {threshold} is not above half of the {shares} "
                "shares")
    return None


def check_unmask(configs: ConfigRecord) -> str | None:
    """Why a site refuses the coordinator's unmask request, or None: no site may be named
    both alive (its private mask's share) and dropped (its key's share)."""
    try:
        alive = {int(n) for n in configs[Key.ACTIVE_NODE_ID_LIST]}
        dead = {int(n) for n in configs[Key.DEAD_NODE_ID_LIST]}
    except (KeyError, TypeError, ValueError):
        return "the unmask request is incomplete"
    if alive & dead:
        return "the unmask request names a site both alive and dropped"
    return None


def check_secagg_reply(content: RecordDict, stage: str) -> list[str]:
    """Problems of a site's reply to SecAgg+ stage ``stage`` (empty when it conforms)."""
    problems = []
    allowed_records = {CONFIGS} | (FIT_RECORDS if stage == Stage.COLLECT_MASKED_VECTORS
                                   else set())
    extra = set(content.keys()) - allowed_records
    if extra:
        problems.append(f"records not allowed in a {stage} reply: {sorted(extra)}")
    if CONFIGS not in content.config_records:
        return problems + ["no secure-aggregation record"]
    keys = set(content.config_records[CONFIGS].keys())
    expected = STAGE_REPLY_KEYS.get(stage, frozenset())
    if keys - expected:
        problems.append(f"values not allowed in a {stage} reply: {sorted(keys - expected)}")
    if expected - keys:
        problems.append(f"values missing from a {stage} reply: {sorted(expected - keys)}")
    if stage == Stage.COLLECT_MASKED_VECTORS and not FIT_REQUIRED <= set(content.keys()):
        problems.append(f"records missing from a {stage} reply: "
                        f"{sorted(FIT_REQUIRED - set(content.keys()))}")
    if "fitres.parameters" in content.array_records and \
            len(content.array_records["fitres.parameters"]):
        problems.append("the update left the site unmasked")
    if "fitres.metrics" in content.config_records:
        from moma_protocol.wire import TRAIN_METRICS

        names = set(content.config_records["fitres.metrics"].keys())
        if names - TRAIN_METRICS:
            problems.append(f"metrics not allowed: {sorted(names - TRAIN_METRICS)[:5]}")
    return problems
