"""Traffic policy and resilience, one concern per module: routes, retries, breakers, rate limits,
concurrency and priority, load balancing, the response cache; `kinds` registers their policy kinds, `view` reads
the policies in force, `traffic` holds the state they drive."""
