"""Access policy enforced on the box: keys, roles and scopes, grants, audit."""
