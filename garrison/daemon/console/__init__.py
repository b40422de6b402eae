"""The web console at /console: server-rendered pages over the same operations as the API and CLI.

`sessions` (sign-in, the session cookie, CSRF; the auth middleware asks it who a request is),
`security` (the console's headers and HTML error pages), `pages` (the routes, as a ROUTES table),
`plots` (training curves as SVG). Templates and the small scripts and stylesheet it serves are
package data: nothing is fetched from another host.
"""
