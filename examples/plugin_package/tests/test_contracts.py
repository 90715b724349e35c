"""The example plugins pass servekit's conformance kits (``pip install 'servekit[testing]'``)."""

from servekit_example_plugins import CacheAffinityPolicy, DeadlinePolicy, TenantTokensHook

from servekit.testing import HookContract, RoutingPolicyContract, SchedulingPolicyContract


class TestDeadlinePolicy(SchedulingPolicyContract):
    policy_factory = DeadlinePolicy


class TestTenantTokensHook(HookContract):
    hook_factory = TenantTokensHook


class TestCacheAffinityPolicy(RoutingPolicyContract):
    policy_factory = CacheAffinityPolicy
