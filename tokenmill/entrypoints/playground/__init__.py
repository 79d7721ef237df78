"""The web playground: a page over the OpenAI-compatible API, served by the package itself.

    tokenmill serve ...        GET /  ->  /playground/  (the page; the engine is this server)
    tokenmill playground       GET /  ->  the same page plus an Engines tab; each engine is a
                                          `tokenmill serve` subprocess reached through /engines/{id}/...

The page (static/: plain ES modules, no build, no CDN) talks only to the engine's public API: chat and
completions, /metrics, /v1/models, and one playground route, POST /playground/api/bench, which runs
`bench serve` against the server it is part of. Static files are public; every data call carries the
API key the page asks for, so the playground opens nothing that --api-key protects.
"""
