"""Per-tenant quotas: the scheduler's pinned-session and pinned-block caps and the fair
share of pin slots (one tenant cannot push another's pinned sessions off the GPU beyond
its share), and the limits read from the keys file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sched_helpers import make_scheduler, run_turn

from pagedkv.scheduler.config import SchedulerConfig
from pagedkv.scheduler.session import SessionState as S
from pagedkv.serving.quotas import (
    ConnectionQuotas,
    TenantLimits,
    TenantPolicy,
    load_policy,
    scheduler_caps,
)


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def pin(sched: object, sid: str, tenant: str, start: int, n: int = 4) -> None:
    sched.open_session(sid, tenant=tenant)  # type: ignore[attr-defined]
    run_turn(sched, sched.begin_turn(sid, toks(start, n)))  # type: ignore[arg-type,attr-defined]


def test_a_flooding_tenant_cannot_push_another_below_its_fair_share() -> None:
    sched, _clock = make_scheduler(max_pinned_sessions=4, num_gpu=64)
    for i in range(4):  # the flood fills every pin slot while alone
        pin(sched, f"a{i}", "a", 100 * i)
    assert sched.pinned_by_tenant() == {"a": 4}
    pin(sched, "b0", "b", 1000)
    pin(sched, "b1", "b", 1100)
    # b took its share (2 of 4) from a, which was over its share
    assert sched.pinned_by_tenant() == {"a": 2, "b": 2}
    for i in range(4, 12):  # a keeps opening sessions: it can only evict its own
        pin(sched, f"a{i}", "a", 100 * i)
        assert sched.pinned_by_tenant()["b"] == 2
        assert sched.session("b0").state == S.IDLE and sched.session("b1").state == S.IDLE
    sched.check_invariants()


def test_a_lone_tenant_may_use_every_slot() -> None:
    sched, _clock = make_scheduler(max_pinned_sessions=4, num_gpu=64)
    for i in range(6):
        pin(sched, f"a{i}", "a", 100 * i)
    assert sched.pinned_by_tenant() == {"a": 4}  # at the global cap, its own LRU evicted
    sched.check_invariants()


def test_default_pinned_cap_applies_to_every_unnamed_tenant() -> None:
    sched, _clock = make_scheduler(
        max_pinned_sessions=8, num_gpu=64, tenant_default_max_pinned=2,
        tenant_max_pinned={"vip": None},
    )  # fmt: skip
    for i in range(4):
        pin(sched, f"x{i}", "x", 100 * i)
        pin(sched, f"vip{i}", "vip", 5000 + 100 * i)
    assert sched.pinned_by_tenant() == {"x": 2, "vip": 4}
    assert sched.session("x0").state == S.OFFLOADED  # x made room from its own sessions
    sched.check_invariants()


def test_pinned_blocks_cap_makes_room_from_the_tenants_own_sessions() -> None:
    # block_size 4: 16 tokens = 4 blocks; the cap of 6 blocks fits one such session
    sched, _clock = make_scheduler(
        max_pinned_sessions=8, num_gpu=64, tenant_max_pinned_blocks={"t": 6}
    )
    pin(sched, "t0", "t", 0, 16)
    pin(sched, "u0", "u", 500, 16)
    pin(sched, "t1", "t", 1000, 12)
    assert sched.tenant_gpu_blocks("t") <= 6
    assert sched.session("t0").state == S.OFFLOADED and sched.session("u0").state == S.IDLE
    assert sched.tenant_gpu_blocks("u") == 4  # another tenant is not held to t's cap
    sched.check_invariants()


def test_scheduler_config_checks_tenant_caps() -> None:
    with pytest.raises(ValueError, match="tenant_default_max_pinned"):
        SchedulerConfig(tenant_default_max_pinned=0)
    with pytest.raises(TypeError, match="tenant_max_pinned_blocks"):
        SchedulerConfig(tenant_max_pinned_blocks={"t": 1.5})  # type: ignore[dict-item]
    cfg = SchedulerConfig(tenant_max_pinned={"a": 3, "b": None}, tenant_default_max_pinned=1)
    assert (cfg.tenant_pinned_cap("a"), cfg.tenant_pinned_cap("b")) == (3, None)
    assert cfg.tenant_pinned_cap("other") == 1


# -- connection quotas and the keys file --------------------------------------------------


def test_connection_quotas_count_globally_and_per_tenant() -> None:
    policy = TenantPolicy(TenantLimits(max_connections=2),
                          {"big": TenantLimits(max_connections=None)})  # fmt: skip
    q = ConnectionQuotas(policy, max_connections=5)
    q.open_connection("a")
    q.open_connection("a")
    with pytest.raises(Exception) as err:
        q.open_connection("a")
    assert (err.value.status, err.value.code) == (429, "rate_limit_exceeded")  # type: ignore[attr-defined]
    for _ in range(3):
        q.open_connection("big")  # no tenant cap: only the global one
    with pytest.raises(Exception, match="limit 5"):
        q.open_connection("big")
    q.close_connection("a")
    q.open_connection("big")
    assert q.snapshot()["connections_by_tenant"] == {"a": 1, "big": 4}


def test_keys_file_limits(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({
        "keys": [{"key": "sk-1", "tenant": "acme"}],
        "default_limits": {"max_connections": 4, "max_pinned_sessions": 2},
        "tenants": {"acme": {"max_connections": 64, "max_pinned_blocks": None}},
    }))  # fmt: skip
    policy = load_policy(path, TenantLimits(max_http_requests=8, max_pinned_blocks=100))
    assert policy.default == TenantLimits(max_connections=4, max_http_requests=8,
                                          max_pinned_sessions=2, max_pinned_blocks=100)  # fmt: skip
    # a tenant's entry replaces what it names and keeps the defaults for the rest
    assert policy.limits("acme") == TenantLimits(max_connections=64, max_http_requests=8,
                                                 max_pinned_sessions=2, max_pinned_blocks=None)  # fmt: skip
    caps = scheduler_caps(policy)
    cfg = SchedulerConfig(**caps)
    assert cfg.tenant_pinned_cap("acme") == 2 and cfg.tenant_pinned_cap("zed") == 2
    assert cfg.tenant_blocks_cap("acme") is None and cfg.tenant_blocks_cap("zed") == 100


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"keys": [], "default_limit": {}}, "unknown fields"),
        ({"keys": [], "default_limits": {"max_conections": 1}}, "unknown limits"),
        ({"keys": [], "default_limits": {"max_connections": 0}}, "must be an int >= 1"),
        ({"keys": [], "tenants": {"bad name": {}}}, "tenant name"),
        ({"keys": [], "tenants": []}, "must be an object"),
        ([], "expected an object"),
    ],
)
def test_keys_file_limit_errors(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        load_policy(path)


def test_a_wait_for_the_tenants_own_cap_times_out_as_its_quota() -> None:
    sched, clock = make_scheduler(
        max_pinned_sessions=8, tenant_max_pinned={"t": 1}, queue_timeout_s=1.0
    )
    sched.open_session("t1", tenant="t")
    assert sched.begin_turn("t1", toks(0, 4)) is not None  # running: t is at its cap
    sched.open_session("t2", tenant="t")
    assert sched.begin_turn("t2", toks(50, 4)) is None
    sched.open_session("u1", tenant="u")
    sched.begin_turn("u1", toks(100, 4))
    sched.mark_computed("u1")
    clock.now = 2.0
    (refused,) = [e for e in sched.poll() if e.session_id == "t2"]
    assert refused.error.reason == "tenant_quota"  # type: ignore[attr-defined]
    sched.check_invariants()
