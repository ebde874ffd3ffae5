"""aiohttp for the api modules, imported without the trust stores it would load for
nothing (see nbia_sync.tls). They import it from here rather than directly, so that
whichever of them is imported first installs it, and the modules `status` needs from this
package (models, retry) import no HTTP client at all."""

from nbia_sync.tls import install

install()

import aiohttp as aiohttp  # noqa: E402  (after install: that is the point)
