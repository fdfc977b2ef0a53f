"""The web console at ``/console``: an admin view (master key) and a tenant view (a tenant's key).

Served by the gateway itself, offline (its chart library is vendored, ``static/vendor/``), in
front of LiteLLM: the shield (``twllm.gateway.asgi``) hands every path under ``PREFIX`` to
``app.build_app``'s ASGI app. Modules:

- ``access``: who calls (bearer key → admin or tenant) and which routes each may use;
- ``queries``: the SQL behind the views (sync psycopg, run in a worker thread by ``api``);
- ``health``: components' health from the supervisor's state.json (``twllm.status``);
- ``api``: the JSON API under ``/console/api/``;
- ``app``: routing, the static files, and the security headers of every console response.

No cookies are set or read: the browser keeps the key in sessionStorage and sends it as
``Authorization: Bearer``.
"""

PREFIX = "/console"
