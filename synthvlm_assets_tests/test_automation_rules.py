"""The automation rule (docs/architecture.md, "What automation fills in"), decided by Dagster's own evaluator:
`evaluate_automation_conditions` over the code location's automated assets (their keys, dependencies,
partitions, code versions and automation conditions, as build_definitions makes them) on a real instance, the
cursor carried from tick to tick as the sensor carries it. Only the asset bodies are stubs: they publish the
data version a test sets, so "new data" is under the test's control. And the nightly sensor: its due time on an
injected clock, one backfill request over the incomplete shards, and its skips."""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from datetime import datetime, timezone

import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    DagsterRunStatus,
    DataVersion,
    Definitions,
    MaterializeResult,
    build_sensor_context,
    deserialize_value,
    evaluate_automation_conditions,
    instance_for_test,
    materialize,
    multi_asset,
    serialize_value,
)

# Private, test only: what the automation sensor does with its requests (a backfill, as the sensor daemon
# submits it) and what a user does with it (cancel it), which have no public API.
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
from dagster._core.storage.tags import BACKFILL_ID_TAG, PARTITION_NAME_TAG

from synthvlm_assets.defs.automation import AUTOMATION_RUN_TAGS, latest_nightly, nightly_sensor
from synthvlm_assets.defs.build import Settings, build_definitions
from synthvlm_assets.defs.partitions import caption_shards
from synthvlm_assets.query import STEPS

CHAIN = list(STEPS)  # the per-shard chain, in order
CURATION = CHAIN[:2]
SELECTION = "synthvlm_100k"


class Location:
    """The automated assets of the code location with stub bodies, an instance, and the automation sensor's
    cursor. `data[(asset, shard)]` is the data version the next materialization of that partition publishes;
    `fail` names assets whose next materialization raises."""

    def __init__(self, instance: DagsterInstance, code_versions: dict[str, str] | None = None) -> None:
        self.instance, self.cursor = instance, None
        self.data: dict[tuple[str, str | None], str] = {}
        self.published: dict[tuple[str, str | None], str] = {}
        self.fail: set[str] = set()
        real = build_definitions(Settings())
        overrides = code_versions or {}
        self.assets = [
            self._stub(a, overrides) for a in real.assets if any(spec.automation_condition for spec in a.specs)
        ]
        self.defs = Definitions(assets=self.assets)
        self.keys = [spec.key for a in self.assets for spec in a.specs]

    def _stub(self, assets_def, overrides):
        specs = [
            spec.replace_attributes(code_version=overrides.get(spec.key.to_user_string(), spec.code_version))
            for spec in assets_def.specs
        ]

        @multi_asset(specs=specs, name=assets_def.node_def.name, can_subset=True)
        def stub(context):
            shard = context.partition_key if context.has_partition_key else None
            for key in [spec.key for spec in specs if spec.key in context.selected_asset_keys]:  # in graph order
                name = key.to_user_string()
                if name in self.fail:
                    raise RuntimeError(f"{name} failed")
                yield MaterializeResult(asset_key=key, data_version=DataVersion(self._publish(name, shard)))

        return stub

    def _publish(self, name: str, shard: str | None) -> str:
        """What a stage writes is a function of what its input holds now and of `data`: new data in, new data
        out; a rerun on the same input writes the same data (the same data version)."""
        if name == SELECTION:
            inputs = sorted(v for (n, _), v in self.published.items() if n == "image_scores")
        else:
            inputs = [self.published.get((CHAIN[CHAIN.index(name) - 1], shard), "")] if name != CHAIN[0] else []
        version = hashlib.sha256(repr([*inputs, self.data.get((name, shard), "v1")]).encode()).hexdigest()[:8]
        self.published[name, shard] = version
        return version

    def register(self, *shards: str) -> None:
        self.instance.add_dynamic_partitions(caption_shards.name, list(shards))

    def tick(self) -> dict[str, list]:
        """One evaluation of the automation sensor: what it requests, per asset."""
        result = evaluate_automation_conditions(defs=self.defs, instance=self.instance, cursor=self.cursor)
        self.cursor = result.cursor
        self.requested = {
            key.to_user_string(): sorted(result.get_requested_partitions(key), key=str)
            for key in self.keys
            if result.get_requested_partitions(key)
        }
        return self.requested

    def run(self, names: list[str], shard: str | None = None, tags: dict | None = None) -> bool:
        """One run (by hand unless `tags` say otherwise) of `names` for `shard`."""
        result = materialize(
            self.assets, selection=names, partition_key=shard, instance=self.instance, tags=tags, raise_on_error=False
        )
        return result.success

    def new_judge_data(self, shard: str, version: str) -> None:
        """A user's run of judged_captions for `shard` that publishes new data (`version`)."""
        self.data["judged_captions", shard] = version
        assert self.run(["judged_captions"], shard)

    def launch_requested(self) -> Counter:
        """What the last tick requested, run as the sensor's runs are (tagged), one run per partition."""
        by_shard: dict[str | None, list[str]] = {}
        for name, shards in self.requested.items():
            for shard in shards:
                by_shard.setdefault(shard, []).append(name)
        done = Counter()
        for shard, names in by_shard.items():
            assert self.run(names, shard, tags=AUTOMATION_RUN_TAGS), (shard, names)
            done.update(names)
        return done

    def settle(self, max_ticks: int = 10) -> Counter:
        """Tick and run what is requested until a tick requests nothing."""
        done = Counter()
        for _ in range(max_ticks):
            if not self.tick():
                return done
            done += self.launch_requested()
        raise AssertionError(f"automation did not settle: {self.requested}")

    def submit_backfill(self) -> str:
        """What the automation sensor does with the last tick's requests (emit_backfills): one backfill."""
        subsets = {
            AssetKey(name): caption_shards.empty_subset().with_partition_keys(shards)
            for name, shards in self.requested.items()
            if name != SELECTION
        }
        backfill_id = uuid.uuid4().hex[:8]
        self.instance.add_backfill(
            PartitionBackfill.from_asset_graph_subset(
                backfill_id=backfill_id,
                dynamic_partitions_store=self.instance,
                backfill_timestamp=datetime.now(timezone.utc).timestamp(),
                asset_graph_subset=AssetGraphSubset(partitions_subsets_by_asset_key=subsets),
                tags=AUTOMATION_RUN_TAGS,
                title=None,
                description=None,
                run_config=None,
            )
        )
        return backfill_id

    def end_backfill(self, backfill_id: str, status: BulkActionStatus = BulkActionStatus.CANCELED) -> None:
        """The user cancels it, or the backfill daemon marks it done."""
        backfill = self.instance.get_backfill(backfill_id)
        self.instance.update_backfill(backfill.with_status(status))

    def start_run(self, names: list[str], shard: str):
        """A run a user launched: planned and started, its steps not executed yet."""
        job = self.defs.resolve_implicit_global_asset_job_def()
        return self.instance.create_run_for_job(
            job_def=job,
            asset_selection=frozenset(AssetKey(n) for n in names),
            tags={PARTITION_NAME_TAG: shard},
            status=DagsterRunStatus.STARTED,
        )


@pytest.fixture
def location():
    with DagsterInstance.ephemeral() as instance:
        yield Location(instance)


def new_shard(location: Location, shard: str) -> None:
    """A shard registered and run end to end by automation, with the selection after it."""
    if location.cursor is None:
        assert location.tick() == {}  # the first tick ever requests nothing: automation was just turned on
    location.register(shard)
    assert location.settle() == Counter({**dict.fromkeys(CHAIN, 1), SELECTION: 1})


def test_a_new_shard_runs_end_to_end_in_one_request_then_the_selection(location):
    assert location.tick() == {}  # the sensor is on before any file arrives
    location.register("s1")
    assert location.tick() == dict.fromkeys(CHAIN, ["s1"])  # the whole chain at once: one backfill
    location.launch_requested()
    assert location.tick() == {SELECTION: [None]}  # automation scored new data
    location.launch_requested()
    assert location.tick() == {}
    assert location.tick() == {}


@pytest.mark.parametrize("tick_before_cancel", [True, False], ids=["tick-before-cancel", "cancel-before-tick"])
def test_a_cancelled_backfill_is_not_relaunched_until_its_input_changes(location, tick_before_cancel):
    """Issue 18, problem 1. The sensor's backfill for a new shard curates it (new data upstream of the GPU
    stages), then the user cancels the backfill: the GPU stages stay missing over the next ticks, whether or not
    a tick saw the new data while they were planned. When their input gets new data, they run."""
    location.tick()
    location.register("s1")
    assert location.tick() == dict.fromkeys(CHAIN, ["s1"])
    backfill = location.submit_backfill()
    assert location.tick() == {}  # submitted, nothing run yet
    assert location.run(CURATION, "s1", tags={**AUTOMATION_RUN_TAGS, BACKFILL_ID_TAG: backfill})
    if tick_before_cancel:
        assert location.tick() == {}  # the rest is planned in the backfill
    location.end_backfill(backfill)
    for _ in range(3):
        assert location.tick() == {}

    # Its input changes (the user reruns curation, which now writes other data): the cancelled chain resumes.
    location.data["curated_captions", "s1"] = "v2"
    assert location.run(["curated_captions"], "s1")
    assert location.tick() == {"pair_filtered_captions": ["s1"]}
    location.launch_requested()
    assert location.settle() == Counter({**dict.fromkeys(CHAIN[3:], 1), SELECTION: 1})


def test_a_cancelled_user_run_is_not_relaunched_until_its_input_changes(location):
    """A user reruns a shard's GPU stages; judged_captions gets new data (from another run) while the run is
    planned, and the user cancels it: its stale images are not relaunched. New judge data after that: they are."""
    new_shard(location, "s1")
    for tick_before_cancel in (True, False):
        run = location.start_run(["sdxl_images", "image_scores"], "s1")
        assert location.tick() == {}
        location.new_judge_data("s1", f"cancelled-{tick_before_cancel}")
        if tick_before_cancel:
            assert location.tick() == {}  # sdxl_images is planned in the user's run
        location.instance.report_run_canceled(run)
        assert location.instance.get_run_by_id(run.run_id).status == DagsterRunStatus.CANCELED
        for _ in range(3):
            assert location.tick() == {}

    location.new_judge_data("s1", "v3")
    assert location.settle() == Counter({"sdxl_images": 1, "image_scores": 1, SELECTION: 1})


def test_a_failed_step_is_not_retried_until_its_input_changes(location):
    """The sensor's backfill of a new shard fails at sdxl_images after judging it (the judge's new data comes from
    that same backfill): no retry on the next ticks, nor once the backfill is over. New judge data later: a retry."""
    location.tick()
    location.register("s1")
    assert location.tick() == dict.fromkeys(CHAIN, ["s1"])
    backfill = location.submit_backfill()
    assert location.tick() == {}
    location.fail = {"sdxl_images"}
    assert not location.run(CHAIN, "s1", tags={**AUTOMATION_RUN_TAGS, BACKFILL_ID_TAG: backfill})
    location.fail = set()
    assert location.tick() == {}
    location.end_backfill(backfill, BulkActionStatus.COMPLETED_FAILED)
    for _ in range(3):
        assert location.tick() == {}
    location.new_judge_data("s1", "v2")
    assert location.settle() == Counter({"sdxl_images": 1, "image_scores": 1, SELECTION: 1})


def test_a_shard_the_user_left_unsynthesized_stays_so(location):
    """Issue 18, problem 2. The user curates and judges a new shard by hand and leaves its images out: automation
    does not fill them in, not on the next ticks, not when the judge's data changes, not when the SDXL settings
    change, and not when a curation setting change reruns what the user did run."""
    location.tick()
    location.register("s1")
    assert all(location.run([name], "s1") for name in CHAIN[:4])
    for _ in range(3):
        assert location.tick() == {}
    location.new_judge_data("s1", "v2")
    assert location.tick() == {}

    # New settings: the existing partitions rerun, the missing ones stay missing.
    changed = Location(location.instance, code_versions={"curated_captions": "2.new", "sdxl_images": "2.new"})
    changed.cursor = location.cursor
    for stage in ["curated_captions", "pair_filtered_captions", "judged_captions"]:
        changed.data[stage, "s1"] = "v3"  # each rerun writes new data
    assert changed.settle() == Counter(
        dict.fromkeys(["curated_captions", "pair_filtered_captions", "judged_captions"], 1)
    )
    assert changed.tick() == {}

    # A new shard whose curation the user launched before the sensor's tick: the run is planned, so the shard
    # is the user's; its GPU stages are not added to it.
    changed.register("s2")
    run = changed.start_run(CURATION, "s2")
    assert changed.tick() == {}
    assert changed.run(CURATION, "s2")  # its work, done here by a run of the test's own
    changed.instance.report_run_canceled(run)  # and the planned run ends
    for _ in range(3):
        assert changed.tick() == {}


def test_turning_automation_back_on_runs_only_new_and_stale_shards(location):
    """Automation off for a while (no ticks; the sensor keeps its cursor) while the user works by hand. The first
    tick after turning it back on requests: the shard nobody touched, end to end; the images of the shard whose
    judge data the user changed; the selection (a shard the user scored changed its input). Not: the shard the
    user only curated, nor the one the user ran end to end."""
    new_shard(location, "s1")
    # automation off
    location.register("s2", "s3", "s4")
    assert location.run(CURATION, "s3")
    assert all(location.run([name], "s4") for name in CHAIN)
    location.new_judge_data("s1", "v2")

    # automation on
    assert location.tick() == {
        **dict.fromkeys(CHAIN, ["s2"]),
        "sdxl_images": ["s1", "s2"],
        SELECTION: [None],
    }
    done = location.launch_requested()
    assert done + location.settle() == Counter(
        {**dict.fromkeys(CHAIN, 1), "sdxl_images": 2, "image_scores": 2, SELECTION: 2}
    )
    assert location.instance.get_materialized_partitions(AssetKey("pair_filtered_captions")) == {"s1", "s2", "s4"}


# The nightly sensor.

PER_SHARD_KEYS = [AssetKey(name) for name in CHAIN]


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def test_latest_nightly():
    assert latest_nightly(at("2026-12-05 02:00")) == at("2026-12-05 02:00")
    assert latest_nightly(at("2026-12-05 01:59")) == at("2026-12-04 02:00")
    assert latest_nightly(at("2026-12-05 23:00")) == at("2026-12-05 02:00")


def test_nightly_sensor_submits_one_backfill_of_the_incomplete_shards_once_a_night():
    now = {"t": at("2026-12-05 01:59")}
    sensor = nightly_sensor(caption_shards, PER_SHARD_KEYS, clock=lambda: now["t"])
    with instance_for_test() as instance:
        location = Location(instance)
        location.register("s1", "s2", "s3")
        assert location.run(CHAIN, "s1")  # complete
        assert location.run(CURATION, "s2")  # curated only
        started = at("2026-12-04 12:00").timestamp()
        defs = Definitions(assets=location.assets, sensors=[sensor])

        def evaluate(cursor):
            context = build_sensor_context(
                instance=instance, cursor=cursor, last_sensor_start_time=started, definitions=defs
            )
            return sensor.evaluate_tick(context)

        # Started after last night's 02:00: no catch-up of that night.
        first = evaluate(None)
        assert not first.run_requests and "started after 2026-12-04 02:00" in first.skip_message

        now["t"] = at("2026-12-05 02:03")
        night = evaluate(first.cursor)
        (request,) = night.run_requests
        assert request.requires_backfill_daemon() and request.tags["synthvlm/nightly"] == "2026-12-05"
        subset = request.asset_graph_subset
        travelled = deserialize_value(serialize_value(night))  # from the code server to the sensor daemon
        assert travelled.run_requests[0].asset_graph_subset == subset
        todo = {
            key.to_user_string(): set(s.get_partition_keys())
            for key, s in subset.partitions_subsets_by_asset_key.items()
        }
        assert todo == {**dict.fromkeys(CURATION, {"s3"}), **dict.fromkeys(CHAIN[2:], {"s2", "s3"})}
        # The sensor daemon submits it as one backfill: caption_curation's policy gives ranged runs.
        instance.add_backfill(
            PartitionBackfill.from_asset_graph_subset(
                backfill_id="nightly",
                dynamic_partitions_store=instance,
                backfill_timestamp=now["t"].timestamp(),
                asset_graph_subset=subset,
                tags=request.tags,
                title=None,
                description=None,
                run_config=None,
            )
        )
        assert instance.get_backfill("nightly").asset_backfill_data.target_subset == subset

        now["t"] = at("2026-12-05 02:08")
        again = evaluate(night.cursor)
        assert not again.run_requests and "already ran for 2026-12-05" in again.skip_message

        # The next night, with everything complete: nothing to do, and the night counts as done.
        for shard in ("s2", "s3"):
            assert location.run(CHAIN, shard)
        now["t"] = at("2026-12-06 02:04")
        complete = evaluate(again.cursor)
        assert not complete.run_requests and "every shard is complete" in complete.skip_message
        assert complete.cursor == at("2026-12-06 02:00").isoformat()


def test_the_nightly_sensor_is_in_the_code_location_off_by_default():
    defs = build_definitions(Settings())
    nightly = defs.get_sensor_def("nightly_missing_shards")
    assert nightly.default_status.value == "STOPPED"
    assert not defs.schedules
