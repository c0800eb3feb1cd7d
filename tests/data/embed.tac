# app.tac: run with  twistd -ny app.tac
from twisted.application import service

import gateway

application = service.Application("my-app")
proxy = gateway.makeService("etc/proxygate.ini")
proxy.setServiceParent(application)
