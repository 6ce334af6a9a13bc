"""Helpers shared by the federation tests: a tiny teacher and small run settings."""

from __future__ import annotations

from pathlib import Path

import torch

from moma_core.checkpoint import save_checkpoint
from moma_core.data.synthetic import SOURCE_CLASSES, TARGET_CLASSES
from moma_core.models import Architecture, build_model

IMAGE_SIZE = 32


def tiny_teacher(path: Path, classes=SOURCE_CLASSES) -> Path:
    """An untrained (random, seeded) test_efficientnet teacher; enough for plumbing tests."""
    torch.manual_seed(0)
    arch = Architecture("test_efficientnet", tuple(classes), IMAGE_SIZE)
    save_checkpoint(path, build_model(arch).state_dict(), arch, {"purpose": "tests"})
    return path


def tiny_run(**overrides):
    """Small run settings; ``overrides`` by run-config key in snake_case."""
    from moma_protocol.settings import RunConfig

    values = dict(run_name="t", num_rounds=2, student_model="test_efficientnet",
                  classes=",".join(TARGET_CLASSES), image_size=IMAGE_SIZE, local_epochs=1,
                  batch_size=16, lr=0.003, optimizer="adamw", augment="flip", queue_size=64,
                  min_train_nodes=2, min_available_nodes=2, round_timeout=600.0)
    values.update(overrides)
    return RunConfig.from_flat({k.replace("_", "-"): v for k, v in values.items()})


def synthetic_sites(root: Path, n_sites: int, n: int = 48) -> list[dict]:
    return [{"data-path": "synthetic:target", "cache-dir": str(root / f"site-{i}"),
             "site-index": i, "num-sites": n_sites, "n": n, "site-name": f"site-{i}",
             "device": "cpu"} for i in range(n_sites)]


def site_with_teacher(root: Path):
    """One synthetic site (under ``root``) whose cache already holds a tiny teacher; returns
    (site settings, the teacher's SHA-256)."""
    import json

    from client.site_config import site_settings
    from client.site_state import TeacherCache
    from moma_core.checkpoint import sidecar_path

    teacher = tiny_teacher(root / "teacher.safetensors")
    settings = site_settings(synthetic_sites(root, 1)[0])
    sidecar = json.loads(sidecar_path(teacher).read_text())
    TeacherCache(settings.cache_dir).store(teacher.read_bytes(), sidecar, sidecar["sha256"])
    return settings, sidecar["sha256"]


class InProcessGrid:
    """A Flower grid whose sites answer in this process, at once: a subclass gives the node
    ids (``get_node_ids``) and ``answer(node, msg)``, the reply to a message (None: the site
    does not answer). Message ids and the replies' source and reply-to are set as Flower sets
    them. Messages made outside a Flower process need the ``task_identity`` fixture."""

    def __init__(self) -> None:
        self.replies: dict = {}

    def get_node_ids(self) -> list[int]:
        raise NotImplementedError

    def answer(self, node: int, msg):
        raise NotImplementedError

    def push_messages(self, messages) -> list[str]:
        import uuid

        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            node = msg.metadata.dst_node_id
            reply = self.answer(node, msg)
            if reply is None:
                continue
            reply.metadata.__dict__["_src_node_id"] = node
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            self.replies[mid] = reply
        return ids

    def pull_messages(self, ids) -> list:
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None) -> list:
        """Flower's ``Grid.send_and_receive`` (what ``Strategy.start`` calls)."""
        return self.pull_messages(self.push_messages(list(messages)))


class SiteGrid(InProcessGrid):
    """A Flower grid whose sites are this process: each message goes to the real ClientApp
    handler of its type (``client.client_app``) with the site's node config; ``nodes`` maps
    node ids to node configs."""

    def __init__(self, nodes: dict[int, dict], run_config: dict) -> None:
        super().__init__()
        self.nodes, self.run_config = nodes, run_config
        self.train_metrics: list[dict] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def answer(self, node: int, msg):
        from flwr.app import Context, RecordDict

        import client.client_app as site_app
        from moma_protocol import wire

        handlers = {wire.TRAIN: site_app.train, wire.EVALUATE: site_app.evaluate,
                    wire.TEACHER_STATUS: site_app.teacher_status}
        kind = msg.metadata.message_type
        ctx = Context(run_id=1, node_id=node, node_config=self.nodes[node],
                      state=RecordDict(), run_config=self.run_config)
        reply = handlers[kind](msg, ctx)
        if kind == wire.TRAIN and not reply.has_error():
            self.train_metrics.append(dict(reply.content[wire.METRICS]))
        return reply
