"""Operations: one function per thing an operator or a client does, composing the domains below.

The CLI and the HTTP routes are faces over these; authorization, naming, paths and auditing live
here once (issue 13 moves the remaining operations in).
"""
