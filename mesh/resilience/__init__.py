"""Traffic policy and resilience, one concern per module: routes, retries, breakers, rate limits,
concurrency and priority, load balancing; `kinds` registers their policy kinds, `traffic` holds a node's state."""
