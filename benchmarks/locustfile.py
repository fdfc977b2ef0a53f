"""Locust load test of a twllm gateway (or any OpenAI-compatible endpoint): the users live in twllm.bench.locustfile.

    TWLLM_BENCH_API_KEY=sk-... locust -f benchmarks/locustfile.py --headless -u 16 -r 16 -t 60s \
        --csv out/run --host http://127.0.0.1:4000/v1 --models demo-chat --max-tokens 64

`twllm bench` runs the same users and prints the summary; see README "Load tests".
"""

from twllm.bench.locustfile import OpenAIUser  # noqa: F401  (locust collects the User classes found here)
