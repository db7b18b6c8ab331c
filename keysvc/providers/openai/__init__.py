"""OpenAI: model table, headers, error table and checker.

Kept light: the provider object is ``keysvc.providers.openai.provider.PROVIDER``.
"""
