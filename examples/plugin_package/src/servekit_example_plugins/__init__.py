"""Example servekit plugins, registered through entry points (see pyproject.toml).

- ``policy.deadline``: :class:`DeadlinePolicy`, earliest deadline first.
- ``hook.tenant_tokens``: :class:`TenantTokensHook`, tokens per tenant.
- ``routing_policy.cache_affinity``: :class:`CacheAffinityPolicy`, most cached blocks first,
  with a load penalty.
"""

from servekit_example_plugins.deadline import DeadlinePolicy
from servekit_example_plugins.routing import CacheAffinityPolicy
from servekit_example_plugins.tenant_tokens import TenantTokensHook

__all__ = ["CacheAffinityPolicy", "DeadlinePolicy", "TenantTokensHook"]
