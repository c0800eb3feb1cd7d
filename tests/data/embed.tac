# app.tac: run with  twistd -ny app.tac  (from any folder)
import os

from twisted.application import service

import gateway

here = os.path.dirname(os.path.abspath(__file__))
application = service.Application("my-app")
proxy = gateway.makeService(os.path.join(here, "etc", "proxygate.ini"))
proxy.setServiceParent(application)
