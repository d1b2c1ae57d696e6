// SPDX-License-Identifier: MIT
pragma solidity ^0.8.27;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @dev The part of USDC that settlement calls: the bytes-signature overload of Circle's FiatToken
/// v2.2, which checks ECDSA signatures for EOAs and ERC-1271 for contract wallets. MockUSDC has it
/// too. Older FiatToken versions (v2.1 and before) have only the (v, r, s) overload.
interface IUSDC {
    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external;
}

/// @notice The token mintq sells. Each paid-for mint carries the off-chain payment id, and the
/// contract remembers every id it has minted for, so a batch that is re-sent after a crash or a
/// replaced transaction can never mint twice for the same payment. A payment settled here by an
/// EIP-3009 authorization has exactly one valid id, {authorizationPaymentId}, so the dedupe
/// follows the money rather than whatever id the minter supplies.
contract MintToken is ERC20, AccessControl {
    bytes32 public constant MINTER_ROLE = keccak256("MINTER_ROLE");

    /// @notice The most gas one settlement may use. It bounds what a single item (say, a payer whose
    /// ERC-1271 wallet burns gas) can cost the batch. An EOA's settlement uses about 40k; the rest is
    /// room for contract wallets, including ones that check passkeys (P-256) in software.
    uint256 public constant SETTLEMENT_GAS = 500_000;

    uint256 public immutable mintAmount;

    /// @notice One item of {batchSettleAndMint}: a mint and the EIP-3009 authorization paying for it.
    struct MintItem {
        address recipient;
        // With an authorization to settle, this must be {authorizationPaymentId} of it, or the
        // item is skipped.
        bytes32 paymentId;
        // The authorization to settle (payer -> payTo); from == address(0) means "already paid":
        // mint without settling.
        address from;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
        // 65 bytes r || s || v (v = 27 or 28) for EOAs, or whatever the wallet's ERC-1271 expects.
        bytes signature;
    }

    /// @notice Payment ids that have already been minted for.
    mapping(bytes32 paymentId => bool) public minted;

    event Minted(bytes32 indexed paymentId, address indexed recipient, uint256 amount);
    /// @dev Emitted instead of reverting, so one duplicate or bad item cannot sink a whole batch.
    event MintSkipped(bytes32 indexed paymentId, address indexed recipient);
    /// @dev The authorization for `paymentId` did not settle: nothing was charged or minted and the
    /// id stays unminted. `reason` is USDC's revert data, as returned.
    event SettlementFailed(bytes32 indexed paymentId, address indexed from, bytes reason);

    error EmptyBatch();
    error LengthMismatch(uint256 recipients, uint256 paymentIds);
    error ZeroMintAmount();
    error ZeroAdmin();
    /// @dev A settlement failed with too little gas left to tell whether it failed for want of gas.
    error SettlementOutOfGas();

    constructor(string memory name_, string memory symbol_, uint256 mintAmount_, address admin)
        ERC20(name_, symbol_)
    {
        if (mintAmount_ == 0) revert ZeroMintAmount();
        if (admin == address(0)) revert ZeroAdmin();
        mintAmount = mintAmount_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    /// @notice Mints `mintAmount` to `recipients[i]` for `paymentIds[i]`. Ids already minted and
    /// zero recipients are skipped with {MintSkipped}; a zero recipient leaves its id unminted.
    function batchMint(address[] calldata recipients, bytes32[] calldata paymentIds)
        external
        onlyRole(MINTER_ROLE)
    {
        uint256 n = recipients.length;
        if (n != paymentIds.length) revert LengthMismatch(n, paymentIds.length);
        if (n == 0) revert EmptyBatch();
        uint256 amount = mintAmount;
        for (uint256 i; i < n;) {
            address recipient = recipients[i];
            bytes32 paymentId = paymentIds[i];
            if (recipient == address(0) || minted[paymentId]) {
                emit MintSkipped(paymentId, recipient);
            } else {
                minted[paymentId] = true;
                _mint(recipient, amount);
                emit Minted(paymentId, recipient, amount);
            }
            unchecked {
                ++i;
            }
        }
    }

    /// @notice The payment id of the EIP-3009 authorization (`from`, `nonce`) on `usdc` on this
    /// chain: keccak256(abi.encode(chainid, usdc, from, nonce)), as mintq computes it off chain.
    /// An authorization can settle only once, so it is one payment and gets one id.
    function authorizationPaymentId(address usdc, address from, bytes32 nonce)
        public
        view
        returns (bytes32)
    {
        return keccak256(abi.encode(block.chainid, usdc, from, nonce));
    }

    /// @notice For each item: settles its authorization to `payTo` on `usdc` and mints only if that
    /// succeeded, so a payer is charged exactly when minted for. Ids already minted, zero
    /// recipients and authorizations whose `paymentId` is not their {authorizationPaymentId} are
    /// skipped with {MintSkipped} before settling (their authorizations stay unused); a failed
    /// settlement emits {SettlementFailed} and the batch goes on. The id check is what keeps one
    /// authorization from being settled and minted for under two ids, whoever chose them.
    function batchSettleAndMint(address usdc, address payTo, MintItem[] calldata items)
        external
        onlyRole(MINTER_ROLE)
    {
        uint256 n = items.length;
        if (n == 0) revert EmptyBatch();
        uint256 amount = mintAmount;
        for (uint256 i; i < n;) {
            MintItem calldata item = items[i];
            address recipient = item.recipient;
            bytes32 paymentId = item.paymentId;
            address from = item.from;
            if (
                recipient == address(0)
                    || (from != address(0) && paymentId != authorizationPaymentId(usdc, from, item.nonce))
                    || minted[paymentId]
            ) {
                emit MintSkipped(paymentId, recipient);
            } else if (from == address(0) || _settle(usdc, payTo, item)) {
                minted[paymentId] = true;
                _mint(recipient, amount);
                emit Minted(paymentId, recipient, amount);
            }
            unchecked {
                ++i;
            }
        }
    }

    function _settle(address usdc, address payTo, MintItem calldata item) private returns (bool) {
        try IUSDC(usdc).transferWithAuthorization{gas: SETTLEMENT_GAS}(
            item.from, payTo, item.value, item.validAfter, item.validBefore, item.nonce, item.signature
        ) {
            return true;
        } catch (bytes memory reason) {
            // EIP-150 forwards at most 63/64 of the gas left, so near the end of the gas limit the
            // call may have been given less than SETTLEMENT_GAS. Had it been, less than 1/64 of
            // that would be left now: the failure may be the gas limit's doing, not the item's, so
            // fail the whole transaction instead. Item outcomes then never depend on the gas limit,
            // and gas estimation finds a limit that settles every item that can settle.
            if (gasleft() < SETTLEMENT_GAS / 63) revert SettlementOutOfGas();
            emit SettlementFailed(item.paymentId, item.from, reason);
            return false;
        }
    }
}
