"""UPnP IGD messages: SSDP answers, device descriptions and SOAP, including refusals and junk."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from meshnode.portmap import upnp

SSDP_OK = (b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
           b"USN: uuid:3f1a::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nEXT:\r\n"
           b"SERVER: Debian/12 UPnP/1.1 MiniUPnPd/2.3.1\r\nLOCATION: http://10.61.0.1:43210/rootDesc.xml\r\n\r\n")

DESCRIPTION = b"""<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0"><specVersion><major>1</major><minor>1</minor></specVersion>
<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
<serviceList><service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>
<controlURL>/ctl/L3F</controlURL></service></serviceList>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType><deviceList><device>
<serviceList><service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
<controlURL>/ctl/IPConn</controlURL></service></serviceList></device></deviceList></device></deviceList>
</device></root>"""


def test_ssdp_location() -> None:
    assert upnp.parse_ssdp_location(SSDP_OK) == "http://10.61.0.1:43210/rootDesc.xml"
    assert upnp.parse_ssdp_location(b"M-SEARCH * HTTP/1.1\r\n\r\n") is None
    assert upnp.parse_ssdp_location(SSDP_OK.replace(b"http://", b"file://")) is None
    assert upnp.M_SEARCH.startswith(b"M-SEARCH * HTTP/1.1\r\n") and upnp.M_SEARCH.endswith(b"\r\n\r\n")


def test_description_picks_wan_connection_service() -> None:
    svc = upnp.parse_description(DESCRIPTION, "http://10.61.0.1:43210/rootDesc.xml")
    assert svc == upnp.Service("urn:schemas-upnp-org:service:WANIPConnection:1", "http://10.61.0.1:43210/ctl/IPConn")
    with pytest.raises(upnp.UpnpError, match="no WAN connection service"):
        upnp.parse_description(DESCRIPTION.replace(b"WANIPConnection", b"Other"), "http://10.61.0.1/")
    with pytest.raises(upnp.UpnpError, match="unreadable"):
        upnp.parse_description(b"<root", "http://10.61.0.1/")


def test_soap_request_and_answers() -> None:
    headers, body = upnp.soap_request("urn:schemas-upnp-org:service:WANIPConnection:1", "AddPortMapping",
                                      [("NewExternalPort", "41641"), ("NewPortMappingDescription", "a<b")])
    assert headers["SOAPAction"] == '"urn:schemas-upnp-org:service:WANIPConnection:1#AddPortMapping"'
    assert b"<NewExternalPort>41641</NewExternalPort>" in body and b"a&lt;b" in body
    ok = (b'<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
          b'<u:GetExternalIPAddressResponse xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1">'
          b'<NewExternalIPAddress>11.61.0.1</NewExternalIPAddress></u:GetExternalIPAddressResponse></s:Body></s:Envelope>')
    assert upnp.parse_soap_response(ok, "GetExternalIPAddress") == {"NewExternalIPAddress": "11.61.0.1"}
    fault = (b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault>'
             b'<faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>'
             b'<UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>718</errorCode>'
             b'<errorDescription>ConflictInMappingEntry</errorDescription></UPnPError></detail></s:Fault></s:Body></s:Envelope>')
    with pytest.raises(upnp.UpnpError, match="ConflictInMappingEntry") as info:
        upnp.parse_soap_response(fault, "AddPortMapping")
    assert info.value.code == 718
    with pytest.raises(upnp.UpnpError, match="no AddPortMappingResponse"):
        upnp.parse_soap_response(ok, "AddPortMapping")


def test_entity_expansion_bomb_is_refused() -> None:
    bomb = (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa">' +
            b"".join(b'<!ENTITY %s "%s">' % (bytes([98 + i]), (b"&" + bytes([97 + i]) + b";") * 10) for i in range(8)) +
            b']><r>&i;</r>')
    with pytest.raises(upnp.UpnpError):
        upnp.parse_description(bomb, "http://10.61.0.1/")


@given(st.binary(max_size=600))
@settings(max_examples=300, deadline=None)
def test_fuzzed_parsers_raise_only_upnp_errors(data: bytes) -> None:
    upnp.parse_ssdp_location(data)
    for parse in (lambda d: upnp.parse_description(d, "http://10.61.0.1/"),
                  lambda d: upnp.parse_soap_response(d, "AddPortMapping")):
        try:
            parse(data)
        except upnp.UpnpError:
            pass
